"""``init="loftq"``: PEFT's LoftQ start, for a quantised base.

LoftQ (arXiv 2310.08659) fits the adapter's start to what quantising the base loses: with one
alternation (PEFT's default, the one milora runs) Q = quant(W), and L R = the rank-r SVD part of
W - Q, so that Q + L R is closer to W than Q alone. PEFT computes it (``init_lora_weights="loftq"``
with a `LoftQConfig`), on the CPU since PEFT 0.22 (earlier versions moved every weight to ``"cuda"``).

milora keeps PEFT's factors (A0 = R, B0 = L) and treats the start like every start that moves
part of W into the adapter: in full precision the base is W - s B0 A0 (float64, rounded once), so
the model at step 0 is W and the saved rank-2r update is exact on the original base. Quantised
(`milora.init.quantize`; nf4 for LoftQ's 4 bits, int8 for its 8), the base is Q(W), not
Q(W - s B0 A0) as for the SVD starts: that is the quantisation LoftQ's factors compensate, so the
model at step 0 is Q(W) + s B0 A0, closer to W than QLoRA's Q(W). milora's bitsandbytes nf4
double-quantises the block scales where PEFT's LoftQ fit did not, so its Q differs from the fitted
one by that rounding. PEFT fits L R, not s L R, so the start is LoftQ's only with s = 1
(``lora_alpha`` = r; sqrt(r) with rsLoRA): other scalings are refused. Plain Python: the
configuration checks run before any model is loaded.
"""

from __future__ import annotations

LOFTQ_BITS = {"nf4": 4, "int8": 8}
"""The bitsandbytes quantisations LoftQ fits its start to, and its ``loftq_bits`` for each."""


def loftq_problem(quantization: str | None) -> str | None:
    """Why ``init="loftq"`` cannot run with ``quantization`` (with the fix), or None when it can."""
    if quantization is None:
        return ("init='loftq' fits its start to the rounding error of a quantised base, and this base is in full "
                "precision: set quantization: nf4 (or int8; `milora init --quantize nf4`).")
    if quantization not in LOFTQ_BITS:
        return (f"init='loftq' quantises to {' or '.join(LOFTQ_BITS)} (LoftQ's 4 and 8 bits), not {quantization!r}: "
                "set quantization: nf4 or int8.")
    return None


def scaling_problem(scalings: dict[str, float]) -> str | None:
    """The targets whose LoRA scaling s is not 1 (LoftQ's start needs s = 1), with the fix; None when all are 1."""
    off = {name: scaling for name, scaling in scalings.items() if scaling != 1}
    if not off:
        return None
    name, scaling = next(iter(off.items()))
    return (f"init='loftq' needs the LoRA scaling s = 1 (PEFT fits L R, not s L R, to what the quantisation lost), "
            f"but {len(off)} target(s) have another, e.g. {name} s = {scaling:g}: set lora_alpha equal to r "
            "(and alpha_pattern equal to rank_pattern; sqrt(r) with use_rslora).")
