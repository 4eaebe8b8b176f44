"""Learning-rate grids built from published ratios to LoRA's best rate (``learning_rates: auto``).

"Learning Rate Matters: Vanilla LoRA May Suffice" (arXiv 2602.04998) tunes the learning rate of
ten LoRA variants over three seeds and finds each method's best rate at a characteristic ratio
below LoRA's: MiLoRA about 3.2x lower, PiSSA about 10x, OLoRA and LoRA-GA about 18x. The rule:

    centre(method) = lora_rate / RATE_RATIOS[method]
    grid(method)   = rate_points rates, log-evenly spaced from centre / rate_span to centre * rate_span

(one point: the centre alone). A method without a published ratio keeps LoRA's centre (ratio 1)
unless it shares its start with one that has one: pissa-fast is PiSSA computed by a randomised
SVD, so it takes PiSSA's ratio. Everything else (dora, corda-kpm, corda-ipm, eva, mica, middle,
random) is centred on LoRA's rate and says so in `ratio_source`; widen ``rate_span`` for them, or
give their grid by hand (``learning_rates`` as a mapping).
"""

from __future__ import annotations

import math

RATE_RATIOS = {"lora": 1.0, "milora": 3.2, "pissa": 10.0, "olora": 18.0, "lora-ga": 18.0}
"""LoRA's best rate / the method's best rate, as published (arXiv 2602.04998)."""
SAME_START_AS = {"pissa-fast": "pissa"}
"""Methods whose start is another's computed differently: they take that method's ratio."""


def rate_ratio(method: str) -> float:
    """LoRA's best rate / ``method``'s expected best rate (1 where nothing is published)."""
    return RATE_RATIOS.get(SAME_START_AS.get(method, method), 1.0)


def ratio_source(method: str) -> str:
    """Where `rate_ratio` comes from, in words (for the report)."""
    if method in RATE_RATIOS:
        return "published" if method != "lora" else "reference"
    if method in SAME_START_AS:
        return f"as {SAME_START_AS[method]} (same start)"
    return "none published: LoRA's centre"


def auto_grid(method: str, lora_rate: float, span: float, points: int) -> list[float]:
    """``points`` rates log-evenly from centre / span to centre * span, centre = lora_rate / `rate_ratio`;
    rounded to 3 significant digits (distinct for span > 1)."""
    centre = lora_rate / rate_ratio(method)
    if points == 1:
        return [float(f"{centre:.3g}")]
    exponents = [-1 + 2 * i / (points - 1) for i in range(points)]
    return [float(f"{centre * math.pow(span, e):.3g}") for e in exponents]


def at_grid_edge(rate: float, grid: list[float]) -> str | None:
    """'lowest' / 'highest' when ``rate`` is an end of a grid of 2+ rates (the optimum may lie outside)."""
    if len(grid) < 2:
        return None
    if rate == min(grid):
        return "lowest"
    return "highest" if rate == max(grid) else None
