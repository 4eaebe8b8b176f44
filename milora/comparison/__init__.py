"""`milora compare`: the fair method comparison from one YAML file (see `milora.comparison.sweep`).

    summary = milora.compare("sweep.yaml")   # runs what is left of the grid, writes the report

Layers: `sweep` (keys, grid, data split) -> `worker` (one run) -> `runner` (resumable local or
Ray execution) -> `stats` / `summary` (selection on validation, intervals) -> `report` (markdown,
plots). The result is compare.json's content.
"""

from milora.comparison.driver import compare

__all__ = ["compare"]
