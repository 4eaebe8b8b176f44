"""``init="loftq"``: PEFT's LoftQ, accepted as a method name and refused, with the fix, before anything runs.

LoftQ (arXiv 2310.08659) alternates quantising W and fitting A0, B0 to the quantisation error, so
that Q + s B0 A0 is closer to W than Q alone: its start needs a quantised base (``quantization``
nf4 or int8, LoftQ's 4 and 8 bits). PEFT 0.21 computes it on CUDA or XPU only: both of its entry
points (``init_lora_weights="loftq"`` with a `LoftQConfig`, which runs
`peft.utils.loftq_utils.loftq_init`, and `replace_lora_weights_loftq` on a bitsandbytes 4-bit
model) move every weight to ``"cuda"`` (``"xpu"``) unconditionally, so on a CPU-only torch they
fail with "Torch not compiled with CUDA enabled". milora's machines have no GPU, so a LoftQ path
could not be built and tested here, and milora runs none: every ``init="loftq"`` is refused,
without a quantised base by naming that fix first.

The check is plain Python, so `milora.training.config` and `milora compare` refuse the method
when they validate a config, before any model is loaded.
"""

from __future__ import annotations

LOFTQ_QUANTIZATIONS = ("nf4", "int8")
"""The bitsandbytes quantisations LoftQ fits its start to (``loftq_bits`` 4 and 8)."""


def loftq_refusal(quantization: str | None) -> str:
    """Why ``init="loftq"`` with ``quantization`` does not run, and the fix."""
    if quantization is None:
        return ("init='loftq' fits its start to the rounding error of a quantised base, and this run's base is in "
                "full precision: set quantization: nf4 (or int8; `milora init --quantize nf4`). Note that milora "
                "cannot run LoftQ on a machine without a GPU either (see docs/baselines.md).")
    if quantization not in LOFTQ_QUANTIZATIONS:
        return (f"init='loftq' quantises to {' or '.join(LOFTQ_QUANTIZATIONS)} (LoftQ's 4 and 8 bits), not "
                f"{quantization!r}: set quantization: nf4 or int8.")
    return ("init='loftq' is not run by milora: PEFT 0.21 computes LoftQ on CUDA or XPU only "
            "(peft.utils.loftq_utils moves every weight to 'cuda'), and milora's machines have none to build and "
            f"test it on. For a quantised base use an SVD start with quantization: {quantization} (init: pissa is "
            "PiSSA's QPiSSA, init: milora its minor-component counterpart; docs/quantized-bases.md), or call "
            "PEFT's LoftQ directly on a GPU.")
