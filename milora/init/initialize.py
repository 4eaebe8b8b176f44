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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from tqdm.auto import tqdm

from milora.constants import DATA_INITS
from milora.errors import ModelError, UsageError
from milora.init.experts import (
    expert_count,
    fused_factors,
    parameter_target_name,
    refuse_parameter_targets,
    target_parameters,
    weight_stack,
)
from milora.init.layers import RESIDUAL_BLOCK_BYTES, lora_layers, restore_layer, set_adapter_factors
from milora.init.multimodal import warn_outside_language_model
from milora.init.peft_starts import check_peft_start, get_peft_start_model, is_peft_start
from milora.init.record import (
    ExpertOf,
    InitRecord,
    SolverRun,
    SpectrumStats,
    attach_record,
    init_record,
    report_entry,
)
from milora.init.targets import fingerprint, saved_modules, target_modules, validate_lora_config, weight_matrix
from milora.linalg.decomposition import Components, default_workers, resolve_solver, select_components_many
from milora.models import check_device, peft_wrapping

NULL_SPACE_STARTS = ("zero", "random")
_LIBC_PATH = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC_PATH), "malloc_trim", None) if _LIBC_PATH else None  # glibc only


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
    null_space: str = "zero",
    quantization: str | None = None,
    calibration: Sequence[dict] | None = None,
    pissa_niter: int = 4,
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA model whose adapters start from the chosen singular triplets.

    ``init``: milora (r smallest), pissa (r largest), middle (centred r), random (r seeded random
    triplets) or lora (PEFT's default). The base model is modified in place, as with
    `peft.get_peft_model`. ``device`` is where the decompositions run (default: each weight's
    own device). ``workers``: CPU weights decomposed at once, one BLAS thread each (default:
    `milora.linalg.decomposition.default_workers`, one per thread for small weights, else 1). Under
    torch.distributed the weights are split across ranks and the factors broadcast, so every
    rank ends with identical adapters. ``lora_config.target_parameters`` names fused MoE expert stacks, each expert
    decomposed as its own weight (`milora.init.experts`). Save the result with `milora.save_adapter`, not
    `save_pretrained` (whose rank-r factors need the residual base). ``null_space``: how
    selected singular values that are exactly 0 (rank-deficient weights) start: ``"zero"``
    (the paper's start; those directions cannot train, and a warning says so) or ``"random"``
    (see `start_factors`). Interrupted (Ctrl-C, an error), the model is restored to its
    original weights (up to one rounding) and plain modules before the exception propagates.
    ``lora_config.modules_to_save`` (e.g. a vision-language model's projector) is trained in full and
    saved with the adapter. On an image-text-to-text model, target names match anywhere (PEFT's
    rule, with a warning when they reach past the language model): use
    `milora.language_model_targets` to adapt the language model only.
    ``quantization`` (nf4, fp4, int8; default none): QLoRA-style, the frozen base is then quantised
    with bitsandbytes after the decomposition, W_res in the targets and W in the other Linear
    layers (see `milora.init.quantize`); the saved adapter is still for the full-precision base.
    PEFT's own starts (`milora.constants.PEFT_STARTS`: dora, olora, pissa-fast, corda-kpm, corda-ipm, eva, lora-ga,
    mica, loftq) are computed by PEFT (`milora.init.peft_starts`); the data starts take ``calibration``, a list of
    training batches, ``pissa_niter`` is pissa-fast's number of subspace iterations, and ``init="loftq"`` needs
    ``quantization`` nf4 or int8 (`milora.init.loftq`).
    """
    if is_peft_start(init):
        refuse_parameter_targets(lora_config, f"init={init!r}", "PEFT computes this start for Linear layers only; "
                                 "start fused experts with init milora, pissa, middle, random or lora")
        _check_seed(seed)
        check_peft_start(init, calibration, solver, workers, device, null_space, quantization, pissa_niter)
        if quantization is not None:  # loftq's: fitted by PEFT in full precision, the residual quantised after
            from milora.init.quantize import check_quantizable, quantize_peft_model

            check_quantizable(model, target_modules(model, lora_config), quantization)
        peft_model = get_peft_start_model(model, lora_config, init, calibration, seed, adapter_name, pissa_niter,
                                          quantization)
        if quantization is not None:
            peft_model = quantize_peft_model(peft_model, init_record(peft_model), quantization, adapter_name)
        return peft_model
    if calibration is not None:
        raise ModelError(f"init={init!r} takes no data: drop calibration= (data starts: {', '.join(DATA_INITS)}).")
    check_init_options(lora_config, init, null_space, seed)
    saved_modules(model, lora_config)
    modules = target_modules(model, lora_config)
    parameters = target_parameters(model, lora_config)
    warn_outside_language_model(model, lora_config.target_modules, modules)
    if quantization is not None:
        from milora.init.quantize import check_quantizable  # bitsandbytes only when asked for

        refuse_parameter_targets(lora_config, f"quantization={quantization!r}", "bitsandbytes quantises Linear "
                                 "layers and would leave the experts' residual in full precision; drop quantization")
        check_quantizable(model, modules, quantization)
    if init != "lora":
        resolve_solver(solver, init)  # reject a bad solver / init pair before anything changes
        check_devices(solver, workers, device, {weight_matrix(m).device.type for m in modules.values()}
                      | {parameter.device.type for parameter in parameters.values()})
    record = InitRecord(init=init, solver=solver if init != "lora" else "none", seed=seed,
                        fingerprint=fingerprint(modules, parameters))
    with peft_wrapping():
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    if init != "lora":
        try:
            _initialise_layers(peft_model, record, adapter_name, solver, device, workers, progress, null_space)
        except BaseException as error:
            _undo(peft_model, record, adapter_name, error)
            raise
    attach_record(peft_model, record)
    if quantization is not None:
        from milora.init.quantize import quantize_peft_model

        peft_model = quantize_peft_model(peft_model, record, quantization, adapter_name)
    return peft_model


def check_init_options(lora_config: LoraConfig, init: str, null_space: str, seed: int) -> None:
    """The options of an init, checked before anything is read or changed."""
    validate_lora_config(lora_config, init)
    if null_space not in NULL_SPACE_STARTS:
        raise ModelError(f"null_space must be one of {', '.join(NULL_SPACE_STARTS)}, got {null_space!r}.")
    _check_seed(seed)


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}.")


def _undo(peft_model: PeftModel, record: InitRecord, adapter: str, error: BaseException) -> None:
    """Put back the original weights (W_res + s B0 A0, rounded once) of the layers already
    initialised, and the plain modules PEFT replaced, so an interrupted init leaves a usable model."""
    layers = lora_layers(peft_model)
    for name, (A0, B0) in record.initial_factors.items():
        restore_layer(layers[name], adapter, A0, B0)
    peft_model.unload()
    error.add_note(
        f"milora: the initialisation was interrupted after {len(record.initial_factors)} of {len(layers)} weights; "
        "the model was restored to its original weights (to one rounding of each initialised weight) and modules."
    )


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Each weight's float64 buffers are freed after use, but glibc keeps freed blocks in its
    heaps, and the small long-lived tensors kept per weight (the initial factors) pin them, so
    the process would grow by most of the freed memory (measured in benchmarks/RESULTS.md).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def check_devices(solver: str, workers: int | None, device, weight_devices: set[str]) -> None:
    """Options that only work for decompositions on CPU, checked before the model is modified
    (``weight_devices``: the device types the weights are on)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"workers must be a positive integer, got {workers!r}.")
    if device is not None:
        check_device(device)
    devices = {torch.device(device).type} if device is not None else weight_devices
    if devices == {"cpu"}:
        return
    if workers is not None and workers > 1:
        raise ModelError(f"workers={workers} runs several CPU decompositions at once; "
                         f"decompositions on {sorted(devices)} need workers=1.")
    if solver == "lanczos":
        raise ModelError(f"The lanczos solver runs on CPU, but decompositions would run on {sorted(devices)}: "
                         "use solver='eigh' (or 'auto'), or device='cpu'.")


@dataclass(frozen=True)
class TargetWeight:
    """One (out x in) matrix an init decomposes: a LoRA layer's weight, or expert ``expert`` of its fused stack
    (None for a Linear / Conv1D)."""

    name: str
    layer: LoraLayer
    expert: int | None

    @property
    def matrix(self) -> torch.Tensor:
        return weight_stack(self.layer)[self.expert or 0]


def target_weights(layers: dict[str, LoraLayer]) -> list[TargetWeight]:
    """Every matrix of ``layers`` in order (a fused stack's experts in expert order): the order the seeds follow."""
    return [TargetWeight(name, layer, expert if isinstance(layer, ParamWrapper) else None)
            for name, layer in layers.items() for expert in range(expert_count(layer))]


def _initialise_layers(
    peft_model: PeftModel, record: InitRecord, adapter: str, solver: str, device, workers: int | None, progress: bool,
    null_space: str,
) -> None:
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    targets = target_weights(lora_layers(peft_model))

    def work_device(target: TargetWeight) -> torch.device:
        return torch.device(device) if device is not None else target.matrix.device

    if workers is None:
        on_cpu = all(work_device(target).type == "cpu" for target in targets)
        workers = default_workers([tuple(target.matrix.shape) for target in targets]) if on_cpu else 1
    tasks = (
        (target.matrix.detach().to(work_device(target)), target.layer.r[adapter],
         torch.Generator().manual_seed(record.seed + index))
        for index, target in enumerate(targets) if index % world == rank
    )
    start = time.perf_counter()
    bar = tqdm(targets, desc=f"{record.init} init", unit="weight", disable=not progress or rank != 0)
    layer_starts: list[WeightStart] = []  # the finished experts of the current layer
    # closing: an exception below (Ctrl-C, a failed broadcast) cancels waiting decompositions
    # and restores the BLAS thread settings at once, not when the generator is collected
    with contextlib.closing(select_components_many(tasks, record.init, solver, workers)) as owned_parts:
        for index, target in enumerate(bar):
            owner = index % world
            weight, layer, here = target.matrix, target.layer, work_device(target)
            # gloo moves CPU tensors, NCCL device tensors: communicate on the work device
            r, scaling = layer.r[adapter], layer.scaling[adapter]
            A = torch.empty(r, weight.shape[1], dtype=torch.float64, device=here)
            B = torch.empty(weight.shape[0], r, dtype=torch.float64, device=here)
            stats = torch.zeros(4, dtype=torch.float64, device=here)  # SpectrumStats.as_tensor(), the owner's
            ran = [SolverRun(resolve_solver(solver, record.init, here, tuple(weight.shape), r))]  # the owner's, sent
            if rank == owner:
                start_of = weight_start(next(owned_parts), weight, scaling, null_space, record.seed + index)
                A.copy_(start_of.A)
                B.copy_(start_of.B)
                stats.copy_(start_of.stats.as_tensor())
                ran = [start_of.ran]
            if world > 1:
                for tensor in (A, B, stats):
                    dist.broadcast(tensor, src=owner)
                dist.broadcast_object_list(ran, src=owner)
            layer_starts.append(WeightStart(A, B, SpectrumStats.from_tensor(stats), ran[0]))
            if len(layer_starts) == expert_count(layer):
                _set_layer_start(record, target, layer_starts, adapter, here)
                layer_starts = []
    record.measured["init_seconds"] = time.perf_counter() - start
    record.measured["workers"] = workers
    warn_zero_components(record, null_space)


def _set_layer_start(record: InitRecord, target: TargetWeight, starts: list[WeightStart], adapter: str,
                     device: torch.device) -> None:
    """A layer's residual and factors from its matrices' starts (one per expert; PEFT's packing), and their report
    lines. The factors are rounded to the adapter's dtype before the residual is computed from them."""
    layer = target.layer
    dtype = layer.lora_A[adapter].weight.dtype
    A, B = fused_factors(torch.stack([start.A for start in starts]).to(dtype),
                         torch.stack([start.B for start in starts]).to(dtype))
    errors = set_adapter_factors(layer, adapter, A, B, A, B, device=device)
    record.initial_factors[target.name] = (A.detach().cpu().clone(), B.detach().cpu().clone())
    release_freed_memory()
    expert = isinstance(layer, ParamWrapper)
    for index, (matrix, start, error) in enumerate(zip(weight_stack(layer), starts, errors, strict=True)):
        where = ExpertOf(parameter_target_name(target.name, layer), index) if expert else None
        record.report.append(report_entry(target.name, matrix, layer.r[adapter], layer.scaling[adapter], start.ran,
                                          start.stats, error, where))


@dataclass
class WeightStart:
    """One weight's start from its selected triplets: A (r x in) and B (out x r) in float64, and what
    the report records of it (`report_entry`)."""

    A: torch.Tensor
    B: torch.Tensor
    stats: SpectrumStats
    ran: SolverRun


def weight_start(parts: Components, weight: torch.Tensor, scaling: float, null_space: str, seed: int) -> WeightStart:
    """The start of one weight (out x in) from its triplets ``parts``: the one per-weight step shared by
    `get_model` and the streaming init (`milora.init.streaming`), so both give the same bits.
    ``seed``: the init's seed plus the weight's position among the sorted targets."""
    zero = _zero_components(parts.S, weight)
    A, B = start_factors(parts.U, parts.S, parts.Vh, scaling, zero, null_space, torch.Generator().manual_seed(seed))
    return WeightStart(A, B, SpectrumStats(float(parts.S.max()), float(parts.S.min()), parts.boundary_gap,
                                           int(zero.sum())), SolverRun(parts.solver, parts.reason))


def _zero_components(S: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Selected singular values that are zero to float64 resolution (an exactly rank-deficient W).

    The triplets come from a product W V, so their singular values carry an absolute error of
    about eps ||W||; below min(m, n) eps ||W||_F a value is indistinguishable from 0.
    """
    rows = max(1, RESIDUAL_BLOCK_BYTES // (8 * weight.shape[1]))  # float64 a block of rows at a time
    norm = math.sqrt(sum(float(torch.linalg.norm(weight[start:start + rows].detach().double())) ** 2
                         for start in range(0, weight.shape[0], rows)))
    return min(weight.shape) * torch.finfo(torch.float64).eps * norm >= S


def start_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float, zero: torch.Tensor, null_space: str,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's start (A: r x in, B: out x r) from triplets U (out x r), S (r,), Vh (r x in).

    B = U sqrt(S / s), A = sqrt(S / s) Vh, so s B A = U diag(S) Vh. Components with S = 0
    (``zero``) make both factors 0 there, and gradients never reach them (dL/dB = g (A x)^T,
    dL/dA = B^T g x^T). ``null_space="random"`` starts those components as LoRA does instead:
    B's columns 0 and A's rows a random orthonormal mix of the null-space directions Vh[zero],
    scaled to the row norm of LoRA's default A (1 / sqrt(3)); s B A is unchanged (still 0 there).
    """
    root = (S / scaling).sqrt()
    B, A = U * root, root[:, None] * Vh
    count = int(zero.sum())
    if null_space == "random" and count:
        mix, _ = torch.linalg.qr(torch.randn(count, count, generator=generator, dtype=torch.float64))
        A[zero] = (mix.to(Vh.device) @ Vh[zero]) / math.sqrt(3)
        B[:, zero] = 0
    return A, B


def warn_zero_components(record: InitRecord, null_space: str) -> None:
    dead = [entry for entry in record.report if entry["zero_components"]]
    if not dead or null_space != "zero":
        return
    count = sum(entry["zero_components"] for entry in dead)
    names = ", ".join(entry["module"] for entry in dead[:3]) + (", ..." if len(dead) > 3 else "")
    warnings.warn(
        f"{len(dead)} weight(s) ({names}) are rank-deficient: {count} selected singular values are exactly 0, so "
        "the paper's start sets both factors to 0 there and those adapter directions can never train (the minor "
        "subspace of a rank-deficient weight is any basis of its null space). Pass null_space='random' (CLI "
        "--null-space random, config null_space: random) to start them inside the null space as LoRA does "
        "(B = 0, A random), or leave such modules out of the targets.",
        stacklevel=3,
    )
