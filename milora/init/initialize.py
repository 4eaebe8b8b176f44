"""MiLoRA (and PiSSA, middle, random, plain LoRA) initialisation of a PEFT LoRA model.

For each adapted weight W (out x in) with LoRA rank r and scaling s (alpha / r, or
alpha / sqrt(r) with rsLoRA) and selected triplets U_sel, S_sel, V_sel:

    B = U_sel sqrt(S_sel / s)      (out x r)
    A = sqrt(S_sel / s) V_sel^T    (r x in)
    W_res = W - s * B @ A          (the frozen base weight from now on)

so s * B @ A is the selected part exactly and W_res + s * B @ A = W up to the rounding of
W_res to the weight's dtype: the model's output at step 0 is the pretrained model's.
B and A are computed in float64, rounded to the adapter dtype, and W_res is computed from
the rounded factors, so the identity never depends on the solver's accuracy.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from milora.errors import ModelError
from milora.init.record import InitRecord, attach_record
from milora.init.targets import fingerprint, target_modules, validate_lora_config, weight_matrix
from milora.linalg.decomposition import default_workers, resolve_solver, select_components_many
from milora.models import check_device

_LIBC_PATH = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC_PATH), "malloc_trim", None) if _LIBC_PATH else None  # glibc only


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA layers of a PEFT model, keyed by module name relative to the base model, sorted."""
    prefix = "base_model.model."
    layers = {name.removeprefix(prefix): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    return dict(sorted(layers.items()))


def set_adapter_factors(
    layer: LoraLayer, adapter: str, A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, device=None
) -> float:
    """Set the trainable factors to (A, B) and the base weight to W - s * B0 @ A0 (float64 math).

    Returns the relative reconstruction error ||W_res + s B0 A0 - W||_F / ||W||_F of the stored
    (rounded) residual, i.e. how far the initial model is from the original weight.
    """
    base = layer.get_base_layer()
    weight = weight_matrix(base)
    device = device or weight.device
    scaling = layer.scaling[adapter]
    original = weight.detach().to(device=device, dtype=torch.float64)
    initial_part = (B0.to(device, torch.float64) @ A0.to(device, torch.float64)).mul_(scaling)
    residual = torch.sub(original, initial_part).to(weight.dtype)
    weight.data.copy_(residual.to(weight.device))  # weight is a view for Conv1D, so this writes through
    layer.lora_A[adapter].weight.data.copy_(A)
    layer.lora_B[adapter].weight.data.copy_(B)
    # in place: at most three float64 copies of the weight alive at once
    mismatch = residual.to(torch.float64).add_(initial_part).sub_(original)
    return float(torch.linalg.norm(mismatch) / torch.linalg.norm(original).clamp_min(1e-300))


def get_model(
    model: torch.nn.Module,
    lora_config: LoraConfig,
    init: str = "milora",
    solver: str = "auto",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    adapter_name: str = "default",
    workers: int | None = None,
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA model whose adapters start from the chosen singular triplets.

    ``init``: milora (r smallest), pissa (r largest), middle (centred r), random (r seeded random
    triplets) or lora (PEFT's default). The base model is modified in place, as with
    `peft.get_peft_model`. ``device`` is where the decompositions run (default: each weight's
    own device). ``workers``: CPU weights decomposed at once, one BLAS thread each (default:
    `milora.linalg.decomposition.default_workers`, one per thread for small weights, else 1). Under
    torch.distributed the weights are split across ranks and the factors broadcast, so every
    rank ends with identical adapters. Save the result with `milora.save_adapter`, not
    `save_pretrained` (whose rank-r factors need the residual base).
    """
    validate_lora_config(lora_config, init)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}.")
    modules = target_modules(model, lora_config)
    if init != "lora":
        resolve_solver(solver, init)  # reject a bad solver / init pair before anything changes
        _check_devices(solver, workers, device, modules)
    record = InitRecord(init=init, solver=solver if init != "lora" else "none", seed=seed, fingerprint=fingerprint(modules))
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    if init != "lora":
        _initialise_layers(peft_model, record, adapter_name, solver, device, workers, progress)
    attach_record(peft_model, record)
    return peft_model


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Each weight's float64 buffers are freed after use, but glibc keeps freed blocks in its
    heaps, and the small long-lived tensors kept per weight (the initial factors) pin them:
    a SmolLM2 init ended 389 MiB larger without this, 63 MiB with it (benchmarks/RESULTS.md).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _check_devices(solver: str, workers: int | None, device, modules: dict[str, torch.nn.Module]) -> None:
    """Options that only work for decompositions on CPU, checked before the model is modified."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ModelError(f"workers must be a positive integer, got {workers!r}.")
    if device is not None:
        check_device(device)
    devices = {torch.device(device).type} if device is not None else {weight_matrix(m).device.type for m in modules.values()}
    if devices == {"cpu"}:
        return
    if workers is not None and workers > 1:
        raise ModelError(f"workers={workers} runs several CPU decompositions at once; decompositions on {sorted(devices)} need workers=1.")
    if solver == "lanczos":
        raise ModelError(f"The lanczos solver runs on CPU, but decompositions would run on {sorted(devices)}: "
                         "use solver='eigh' (or 'auto'), or device='cpu'.")


def _initialise_layers(
    peft_model: PeftModel, record: InitRecord, adapter: str, solver: str, device, workers: int | None, progress: bool
) -> None:
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    layers = list(lora_layers(peft_model).items())

    def work_device(layer: LoraLayer) -> torch.device:
        return torch.device(device) if device is not None else weight_matrix(layer.get_base_layer()).device

    if workers is None:
        on_cpu = all(work_device(layer).type == "cpu" for _, layer in layers)
        shapes = [tuple(weight_matrix(layer.get_base_layer()).shape) for _, layer in layers]
        workers = default_workers(shapes) if on_cpu else 1
    owned = [(index, layer) for index, (_, layer) in enumerate(layers) if index % world == rank]
    tasks = (
        (weight_matrix(layer.get_base_layer()).detach().to(work_device(layer)), layer.r[adapter],
         torch.Generator().manual_seed(record.seed + index))
        for index, layer in owned
    )
    start = time.perf_counter()
    bar = tqdm(layers, desc=f"{record.init} init", unit="weight", disable=not progress or rank != 0)
    # closing: an exception below (Ctrl-C, a failed broadcast) cancels waiting decompositions
    # and restores the BLAS thread settings at once, not when the generator is collected
    with contextlib.closing(select_components_many(tasks, record.init, solver, workers)) as owned_parts:
        for index, (name, layer) in enumerate(bar):
            owner = index % world
            weight = weight_matrix(layer.get_base_layer())
            here = work_device(layer)
            # gloo moves CPU tensors, NCCL device tensors: communicate on the work device
            adapter_dtype = layer.lora_A[adapter].weight.dtype
            r, scaling = layer.r[adapter], layer.scaling[adapter]
            A = torch.empty(r, weight.shape[1], dtype=adapter_dtype, device=here)
            B = torch.empty(weight.shape[0], r, dtype=adapter_dtype, device=here)
            stats = torch.zeros(4, dtype=torch.float64, device=here)
            chosen = resolve_solver(solver, record.init, here, tuple(weight.shape), r)
            if rank == owner:
                parts = next(owned_parts)
                root = (parts.S / scaling).sqrt()
                B.copy_(parts.U * root)
                A.copy_(root[:, None] * parts.Vh)
                stats.copy_(torch.tensor([float(parts.S.max()), float(parts.S.min()), parts.boundary_gap, parts.solver != chosen]))
            if world > 1:
                for tensor in (A, B, stats):
                    dist.broadcast(tensor, src=owner)
            error = set_adapter_factors(layer, adapter, A, B, A, B, device=here)
            record.initial_factors[name] = (A.detach().cpu().clone(), B.detach().cpu().clone())
            _release_freed_memory()
            sigma_max, sigma_min, gap, fell_back = stats.tolist()
            record.report.append(
                {
                    "module": name,
                    "shape": list(weight.shape),
                    "rank": r,
                    "scaling": scaling,
                    "solver": f"eigh ({chosen} failed)" if fell_back else chosen,
                    "sigma_max_selected": sigma_max,
                    "sigma_min_selected": sigma_min,
                    "boundary_gap": None if math.isnan(gap) else gap,
                    "reconstruction_error": error,
                }
            )
    record.measured["init_seconds"] = time.perf_counter() - start
    record.measured["workers"] = workers
