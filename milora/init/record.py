"""What milora knows about an adapter beyond PEFT's own config, and where a model keeps it.

`get_model` and `milora.load_model` attach an `InitRecord` to the PEFT model they return;
everything else reads it through `init_record` (which fails clearly for models milora did
not make) or `find_record`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from milora.constants import RESIDUAL_INITS
from milora.errors import ModelError

# Below this relative boundary gap the selected subspace is sensitive: a relative
# perturbation delta of W can rotate it by about delta / gap.
SENSITIVE_GAP = 1e-3
_ATTRIBUTE = "milora_init"


@dataclass(frozen=True)
class SpectrumStats:
    """One weight's selected singular values: the largest and smallest, the relative gap at the block's
    boundary (nan when not computed: random and plain starts) and how many are exactly 0 (`float64`
    resolution)."""

    sigma_max: float
    sigma_min: float
    boundary_gap: float
    zero_components: int

    def as_tensor(self) -> torch.Tensor:
        """The four values as a float64 tensor (4,), as the owner rank broadcasts them."""
        return torch.tensor([self.sigma_max, self.sigma_min, self.boundary_gap, self.zero_components],
                            dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> SpectrumStats:
        sigma_max, sigma_min, gap, zeros = values.tolist()
        return cls(sigma_max, sigma_min, gap, int(zeros))


@dataclass(frozen=True)
class SolverRun:
    """The solver that decomposed a weight and, when it replaced the chosen one, why (``""``: it did not)."""

    solver: str
    reason: str = ""


@dataclass(frozen=True)
class ExpertOf:
    """Which expert of which fused stack a weight is: ``parameter`` as users name it
    (``model.layers.0.mlp.experts.gate_up_proj``), ``expert`` its index."""

    parameter: str
    expert: int


def report_entry(name: str, weight: torch.Tensor, r: int, scaling: float, ran: SolverRun, stats: SpectrumStats,
                 error: float, expert: ExpertOf | None = None) -> dict:
    """One weight's line of the init report, as saved in milora_config.json (``boundary_gap`` None when not
    computed; ``solver_reason`` only when the solver was replaced). ``module`` is the LoRA layer's name (its
    tensors' keys); an expert of a fused stack adds ``parameter`` and ``expert`` (`ExpertOf`), ``shape`` being that
    expert's (out, in)."""
    return {
        "module": name,
        **({"parameter": expert.parameter, "expert": expert.expert} if expert is not None else {}),
        "shape": list(weight.shape),
        "rank": r,
        "scaling": scaling,
        "solver": ran.solver,
        **({"solver_reason": ran.reason} if ran.reason else {}),
        "sigma_max_selected": stats.sigma_max,
        "sigma_min_selected": stats.sigma_min,
        "boundary_gap": None if math.isnan(stats.boundary_gap) else stats.boundary_gap,
        "zero_components": stats.zero_components,
        "reconstruction_error": error,
    }


@dataclass
class InitRecord:
    """What milora knows about an adapter beyond PEFT's own config.

    ``initial_factors`` maps each adapted module (name relative to the base model) to its
    initial ``(A0, B0)`` on CPU; empty for inits whose base weights are untouched (lora, dora, eva, mica).
    ``fingerprint`` identifies the original base weights (see `fingerprint`); ``measured``
    holds checks made by the caller (e.g. the output error at init) and is saved with the adapter.
    ``quantization`` is empty for a full-precision base, else the method and the quantisation
    errors of `milora.init.quantize.quantize_peft_model`.
    """

    init: str
    solver: str
    seed: int
    fingerprint: dict[str, str]
    report: list[dict] = field(default_factory=list)
    initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)

    @property
    def quantization_method(self) -> str | None:
        return self.quantization.get("method")

    def summary(self) -> dict:
        """Aggregate of the per-weight report: solvers, worst init error, smallest boundary gap, time,
        and for a quantised base the mean quantisation errors and initial shares over the targets."""
        gaps = [entry["boundary_gap"] for entry in self.report if entry["boundary_gap"] is not None]
        errors = [entry["reconstruction_error"] for entry in self.report]
        return {
            "init": self.init,
            "weights": len(self.report),
            "solvers": sorted({entry["solver"] for entry in self.report}),
            "max_reconstruction_error": max(errors, default=0.0),
            "min_boundary_gap": min(gaps, default=math.nan),
            "sensitive_subspaces": sum(gap < SENSITIVE_GAP for gap in gaps),
            **self._quantization_summary(),
            **self.measured,
        }

    def _quantization_summary(self) -> dict:
        if not self.quantization:
            return {"quantization": None}
        targets = self.quantization["targets"]

        def mean(key: str) -> float:
            return sum(entry[key] for entry in targets) / len(targets)

        return {
            "quantization": self.quantization["method"],
            "mean_quantization_error": mean("quantization_error"),
            "mean_quantization_error_vs_weight": mean("quantization_error_vs_weight"),
            "mean_initial_share": mean("initial_share"),
            "max_initial_share": max(entry["initial_share"] for entry in targets),
            "other_mean_quantization_error": self.quantization["other_mean_quantization_error"],
        }


def attach_record(peft_model: torch.nn.Module, record: InitRecord) -> None:
    """Keep ``record`` with the model (read it back with `init_record` / `find_record`)."""
    setattr(peft_model, _ATTRIBUTE, record)


def find_record(model: torch.nn.Module) -> InitRecord | None:
    """The record of a model made by milora, or None for any other model."""
    return getattr(model, _ATTRIBUTE, None)


def init_record(peft_model: torch.nn.Module) -> InitRecord:
    """The record of a model made by `milora.get_model` / `milora.load_model` (a clear error otherwise)."""
    record = find_record(peft_model)
    if record is None:
        raise ModelError(
            "This model was not made by milora.get_model or milora.load_model, so milora cannot tell how its "
            "adapter was initialised. Create it with milora.get_model, or save plain LoRA models with save_pretrained."
        )
    return record


def has_residual_base(model: torch.nn.Module) -> bool:
    """True for a milora model whose base weights are residuals W - s B0 A0 (`milora.constants.RESIDUAL_INITS`)."""
    record = find_record(model)
    return record is not None and record.init in RESIDUAL_INITS
