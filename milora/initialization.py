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
import copy
import ctypes
import ctypes.util
import hashlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import get_pattern_key
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from milora.linalg.decomposition import (
    SELECTIONS,
    default_workers,
    resolve_solver,
    select_components_many,
)
from milora.models import check_device

INIT_MODES = SELECTIONS + ("lora",)
# Below this relative boundary gap the selected subspace is sensitive: a relative
# perturbation delta of W can rotate it by about delta / gap.
SENSITIVE_GAP = 1e-3
_LIBC_PATH = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC_PATH), "malloc_trim", None) if _LIBC_PATH else None  # glibc only
_QUANTISED_PACKAGES = ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "optimum.quanto", "hqq", "torchao", "eetq")


@dataclass
class InitRecord:
    """What milora knows about an adapter beyond PEFT's own config.

    ``initial_factors`` maps each adapted module (name relative to the base model) to its
    initial ``(A0, B0)`` on CPU; empty for ``init="lora"``, whose base weights are untouched.
    ``fingerprint`` identifies the original base weights (see `fingerprint`); ``measured``
    holds checks made by the caller (e.g. the output error at init) and is saved with the adapter.
    """

    init: str
    solver: str
    seed: int
    fingerprint: dict[str, str]
    report: list[dict] = field(default_factory=list)
    initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Aggregate of the per-weight report: solvers, worst init error, smallest boundary gap, time."""
        gaps = [entry["boundary_gap"] for entry in self.report if entry["boundary_gap"] is not None]
        errors = [entry["reconstruction_error"] for entry in self.report]
        return {
            "init": self.init,
            "weights": len(self.report),
            "solvers": sorted({entry["solver"] for entry in self.report}),
            "max_reconstruction_error": max(errors, default=0.0),
            "min_boundary_gap": min(gaps, default=math.nan),
            "sensitive_subspaces": sum(gap < SENSITIVE_GAP for gap in gaps),
            **self.measured,
        }


def weight_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The (out x in) weight of a Linear or GPT-2 style Conv1D (stored in x out)."""
    weight = module.weight
    return weight.T if isinstance(module, Conv1D) else weight


def validate_lora_config(lora_config: LoraConfig, init: str) -> None:
    """Reject options that would be silently wrong with an SVD-based start."""
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"Expected a peft.LoraConfig, got {type(lora_config).__name__}.")
    if init not in INIT_MODES:
        raise ValueError(f"Unknown init mode {init!r}: choose one of {', '.join(INIT_MODES)}.")
    if init == "lora":
        if lora_config.init_lora_weights not in (True, "gaussian"):
            raise ValueError(
                f"init='lora' uses PEFT's default initialisation, but init_lora_weights="
                f"{lora_config.init_lora_weights!r}; for SVD-based starts use milora's init= instead."
            )
        return
    if lora_config.init_lora_weights is not True:
        raise ValueError(
            f"init={init!r} sets the adapter itself; leave LoraConfig.init_lora_weights at its default "
            f"(got {lora_config.init_lora_weights!r})."
        )
    if lora_config.modules_to_save:
        raise ValueError("LoraConfig.modules_to_save is not supported by milora; train those modules separately.")
    for option, value, default in (("use_dora", lora_config.use_dora, False), ("bias", lora_config.bias, "none")):
        if value != default:
            raise ValueError(f"LoraConfig.{option}={value!r} is not supported with init={init!r}; use {default!r}.")
    # B = U sqrt(S / s) needs a positive scaling s = alpha / r (or alpha / sqrt(r))
    for option, values in (("r", [lora_config.r, *lora_config.rank_pattern.values()]),
                           ("lora_alpha", [lora_config.lora_alpha, *lora_config.alpha_pattern.values()])):
        bad = [value for value in values if not value > 0]
        if bad:
            raise ValueError(f"LoraConfig.{option} (and its pattern) must be positive for init={init!r}, got {bad[0]!r}.")


def target_modules(model: torch.nn.Module, lora_config: LoraConfig) -> dict[str, torch.nn.Module]:
    """The modules PEFT will adapt, by name, after checking each one can take an SVD start.

    Raises a ValueError naming the problem (missing target, unsupported or quantised module,
    rank too large, non-finite weight, a weight shared by two targets) before anything is modified.
    """
    if isinstance(model, PeftModel) or any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "The model already holds PEFT adapter layers; milora needs the original base model. Load it again "
            "(or take peft_model.unload() of a plain PEFT model; a milora model's base holds residual weights)."
        )
    config = _expand_all_linear(model, lora_config)
    matched = {name: module for name, module in model.named_modules() if name and check_target_module_exists(config, name)}
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_matrix_module(m)})
    if isinstance(config.target_modules, (list, set, tuple)):
        names = [name for name, _ in model.named_modules()]  # not only the matched: exclude_modules may drop some
        missing = sorted(t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            raise ValueError(
                f"Target module(s) {missing} not found in {type(model).__name__}. "
                f"Linear modules it has: {', '.join(leaf_names)}."
            )
    if not matched:
        raise ValueError(f"No module matches target_modules={config.target_modules!r}. Linear modules: {', '.join(leaf_names)}.")
    for name, module in matched.items():
        _check_module(name, module, rank_for(config, name))
    shared = {}
    for name, module in matched.items():
        first = shared.setdefault(module.weight.data_ptr(), name)
        if first != name:
            raise ValueError(
                f"Modules {first} and {name} share one weight tensor (tied weights): the init replaces each adapted "
                "weight by its residual, so a shared weight cannot be adapted twice. Adapt only one of them."
            )
    return matched


def _expand_all_linear(model: torch.nn.Module, lora_config: LoraConfig) -> LoraConfig:
    if lora_config.target_modules != "all-linear":
        return lora_config
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_matrix_module(m) and m is not output}
    config = copy.copy(lora_config)
    config.target_modules = names
    return config


def _is_matrix_module(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, Conv1D)) or _quantised_by(module) is not None


def _quantised_by(module: torch.nn.Module) -> str | None:
    """The quantisation package a module (or its weight) comes from, judged by class, not dtype."""
    for cls in (type(module), type(getattr(module, "weight", None))):
        for package in _QUANTISED_PACKAGES:
            if cls.__module__.startswith(package):
                return package
    return None


def rank_for(config: LoraConfig, name: str) -> int:
    return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)


def _check_module(name: str, module: torch.nn.Module, rank: int) -> None:
    package = _quantised_by(module)
    if package is not None:
        raise ValueError(
            f"Module {name} is quantised ({package} {type(module).__name__}): an SVD start needs the full-precision "
            "weight. Load the model without quantisation, initialise, then quantise the residual model if needed."
        )
    if not isinstance(module, (torch.nn.Linear, Conv1D)):
        raise ValueError(
            f"Module {name} is a {type(module).__name__}; MiLoRA supports torch.nn.Linear and transformers Conv1D. "
            "Remove it from target_modules."
        )
    weight = weight_matrix(module)
    if not weight.is_floating_point():
        raise ValueError(f"Module {name} has a {weight.dtype} weight: load the model in float32, float16 or bfloat16.")
    out_features, in_features = weight.shape
    if not 0 < rank < min(out_features, in_features):
        raise ValueError(
            f"Rank {rank} is too large for {name} ({out_features} x {in_features}): it must be below "
            f"min(out, in) = {min(out_features, in_features)}. Lower r or set rank_pattern for this module."
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"Module {name} has NaN or Inf in its weight: the checkpoint is corrupt or was loaded wrongly.")


def fingerprint(modules: dict[str, torch.nn.Module], samples: int = 4096) -> dict[str, str]:
    """SHA-256 over names, shapes and an evenly strided sample of each weight, in float32 and bfloat16.

    The bfloat16 digest lets a model loaded in a lower precision match an adapter made in float32.
    """
    digests = {"float32": hashlib.sha256(), "bfloat16": hashlib.sha256()}
    for name in sorted(modules):
        weight = weight_matrix(modules[name]).detach()
        flat = weight.reshape(-1)
        count = min(samples, flat.numel())
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        sample = flat[index].float().cpu()
        for dtype, digest in digests.items():
            digest.update(f"{name}:{tuple(weight.shape)}".encode())
            values = sample.to(torch.bfloat16).view(torch.int16) if dtype == "bfloat16" else sample
            digest.update(values.numpy().tobytes())
    return {dtype: digest.hexdigest() for dtype, digest in digests.items()}


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
    peft_model.milora_init = record
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
        raise ValueError(f"workers must be a positive integer, got {workers!r}.")
    if device is not None:
        check_device(device)
    devices = {torch.device(device).type} if device is not None else {weight_matrix(m).device.type for m in modules.values()}
    if devices == {"cpu"}:
        return
    if workers is not None and workers > 1:
        raise ValueError(f"workers={workers} runs several CPU decompositions at once; decompositions on {sorted(devices)} need workers=1.")
    if solver == "lanczos":
        raise ValueError(f"The lanczos solver runs on CPU, but decompositions would run on {sorted(devices)}: "
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
