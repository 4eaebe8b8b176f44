"""The reference model of preference and RL objectives must be the ORIGINAL model W = W_res + s B0 A0.

TRL (1.16) trainers given a `PeftModel` add a frozen "ref" adapter copied from the start, so
the reference is the start, which reproduces the original model. Where TRL does not (PEFT < 0.20
with ``target_parameters``, older TRL releases, an explicit ``ref_model``), its reference is what
disabled adapters or that model give: for an SVD start, the residual base W_res. milora refuses
that twice: `require_reference_adapter` at construction, and `check_reference` on the first
batch, where the reference's log-probabilities must equal the start's (the policy before any
update) to ``|ref - policy| <= REF_RTOL * (1 + |ref|)``.
"""

from __future__ import annotations

import torch

from milora.errors import ConfigError

REF_RTOL = 1e-4
REF_ADAPTER = "ref"


def require_reference_adapter(trainer, objective: str) -> None:
    """Raise when there is neither a separate ``ref_model`` (checked by `check_reference` on the first
    batch) nor the frozen "ref" adapter TRL adds: the reference would be the residual base."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(trainer, "ref_model", None) is None and REF_ADAPTER not in getattr(peft_model, "peft_config", {}):
        raise ConfigError(
            f"{objective}: TRL did not add a frozen '{REF_ADAPTER}' adapter copied from the start, so its reference "
            "would be the residual base (adapters disabled), not the original model. Use peft>=0.20 (for "
            "target_parameters) and TRL 1.16."
        )


def check_reference(ref_logps: torch.Tensor, policy_logps: torch.Tensor, objective: str) -> None:
    """Raise unless the reference's log-probabilities (any shape) equal the start's to REF_RTOL."""
    error = ((ref_logps - policy_logps.to(ref_logps)).abs() / (1 + ref_logps.abs())).max().item()
    if error > REF_RTOL:
        raise ConfigError(
            f"the {objective} reference is not the original model: its log-probabilities differ from the start's by "
            f"{error:.3g} (relative; tolerance {REF_RTOL}). A reference on the residual base is refused."
        )
