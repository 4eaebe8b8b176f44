"""Float64 linear algebra: BLAS/LAPACK bindings and the selected singular triplets of a weight."""
