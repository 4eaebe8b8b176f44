"""What fine-tuning changed: each adapter's update Delta W measured against W's singular subspaces.

A LoRA adapter adds Delta W = s B A to an adapted weight W (out x in); a milora adapter is
saved as the rank-2r update on the original base, s (B A - B0 A0), so the same formula
applies. Let U_k, V_k be W's top-k singular vectors (its principal subspace, where PiSSA
trains), U_-k, V_-k its bottom-k ones (the minor subspace, where MiLoRA trains), k the
adapter's rank unless given. Per weight, in float64:

- ``relative_update``: ||Delta W||_F / ||W||_F.
- ``principal_energy``: ||U_k^T Delta W V_k||_F^2 / ||Delta W||_F^2, the share of the update
  inside W's principal subspace; ``minor_energy`` the same for the minor subspace;
  ``chance_energy`` = k^2 / (out in), their expected value for an update with random directions.
- ``amplification``: ||Delta W||_F / ||U_d^T W V_d||_F with U_d, V_d the top-k singular vectors
  of Delta W (Hu et al. 2021, LoRA, section 7): large when the update amplifies directions
  that W itself barely uses.
- ``principal_rotation``: sine of the largest principal angle between the top-k singular
  subspaces of W and of W + Delta W (max over the left and right sides), and
  ``principal_value_change``: max over the top k of |sigma_i(W + Delta W) - sigma_i(W)| / sigma_i(W).
  Both measure how far fine-tuning moved W's dominant directions, the pretrained knowledge
  MiLoRA aims to leave alone. ``principal_gap`` (per layer) is the relative gap between
  sigma_{k-1} and sigma_k of W: where it is tiny, the top-k subspace is not well defined and
  even a small update can rotate it far.

Delta W is handled through its factors (rank <= 2r): its norm and singular vectors come from
QR factorisations of the factors and an SVD of the small core. W's components come from
`select_components`. An update no larger than the rounding of its factors' product
(||Delta W|| <= 1e-13 ||left|| ||right||, e.g. a milora adapter saved before training) counts
as zero: its relative size and rotation are 0 and the ratios are None.
"""

from __future__ import annotations

import torch

from milora.linalg.decomposition import principal_angle_sine, select_components

ZERO_UPDATE = 1e-13
METRICS = (
    "relative_update", "principal_energy", "minor_energy", "chance_energy", "amplification",
    "principal_rotation", "principal_value_change",
)


def update_metrics(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, k: int) -> dict[str, float | None]:
    """The metrics above for W (m x n) and the update Delta W = left @ right (m x R, R x n)."""
    w, left, right = weight.detach().double(), left.detach().double(), right.detach().double()
    m, n = w.shape
    top = select_components(w, k, "pissa")
    q_left, r_left = torch.linalg.qr(left)  # Delta W = q_left (r_left r_right^T) q_right^T
    q_right, r_right = torch.linalg.qr(right.T)
    core_u, core_s, core_vh = torch.linalg.svd(r_left @ r_right.T)
    norm = float(torch.linalg.norm(core_s))
    # a milora adapter saved before training encodes s (B0 A0 - B0 A0): zero up to rounding
    shared = {"chance_energy": k * k / (m * n), "principal_gap": top.boundary_gap}
    if norm <= ZERO_UPDATE * float(torch.linalg.norm(left) * torch.linalg.norm(right)):
        return {**shared, "relative_update": 0.0, "principal_rotation": 0.0, "principal_value_change": 0.0,
                **dict.fromkeys(("principal_energy", "minor_energy", "amplification"))}

    def energy(parts) -> float:
        return float(torch.linalg.norm((parts.U.T @ left) @ (right @ parts.Vh.T))) ** 2 / norm**2

    directions = int((core_s > core_s[0] * core_s.numel() * torch.finfo(torch.float64).eps).sum().clamp(max=k))
    update_u, update_v = q_left @ core_u[:, :directions], q_right @ core_vh[:directions].T
    updated = select_components(w + left @ right, k, "pissa")
    return {
        **shared,
        "relative_update": norm / float(torch.linalg.norm(w)),
        "principal_energy": energy(top),
        "minor_energy": energy(select_components(w, k, "milora")),
        "amplification": _ratio(norm, float(torch.linalg.norm(update_u.T @ w @ update_v))),
        "principal_rotation": max(principal_angle_sine(top.U, updated.U), principal_angle_sine(top.Vh.T, updated.Vh.T)),
        "principal_value_change": float(((updated.S - top.S).abs() / top.S).max()),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


