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
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from milora.constants import DATA_INITS
from milora.errors import ModelError, UsageError
from milora.init.layers import lora_layers, restore_weight, set_adapter_factors
from milora.init.loftq import loftq_refusal
from milora.init.multimodal import warn_outside_language_model
from milora.init.peft_starts import check_peft_start, get_peft_start_model, is_peft_start
from milora.init.record import InitRecord, SolverRun, SpectrumStats, attach_record, report_entry
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
    rank ends with identical adapters. Save the result with `milora.save_adapter`, not
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
    mica) are computed by PEFT (`milora.init.peft_starts`); the data starts take ``calibration``, a list of training
    batches, and ``pissa_niter`` is pissa-fast's number of subspace iterations. ``init="loftq"`` is refused
    (`milora.init.loftq`: PEFT computes it on GPUs only).
    """
    if init == "loftq":
        raise ModelError(loftq_refusal(quantization))
    if is_peft_start(init):
        _check_seed(seed)
        check_peft_start(init, calibration, solver, workers, device, null_space, quantization, pissa_niter)
        return get_peft_start_model(model, lora_config, init, calibration, seed, adapter_name, pissa_niter)
    if calibration is not None:
        raise ModelError(f"init={init!r} takes no data: drop calibration= (data starts: {', '.join(DATA_INITS)}).")
    check_init_options(lora_config, init, null_space, seed)
    saved_modules(model, lora_config)
    modules = target_modules(model, lora_config)
    warn_outside_language_model(model, lora_config.target_modules, modules)
    if quantization is not None:
        from milora.init.quantize import check_quantizable  # bitsandbytes only when asked for

        check_quantizable(model, modules, quantization)
    if init != "lora":
        resolve_solver(solver, init)  # reject a bad solver / init pair before anything changes
        check_devices(solver, workers, device, {weight_matrix(m).device.type for m in modules.values()})
    record = InitRecord(init=init, solver=solver if init != "lora" else "none", seed=seed,
                        fingerprint=fingerprint(modules))
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
        layer = layers[name]
        restore_weight(weight_matrix(layer.get_base_layer()), A0, B0, layer.scaling[adapter])
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


def _initialise_layers(
    peft_model: PeftModel, record: InitRecord, adapter: str, solver: str, device, workers: int | None, progress: bool,
    null_space: str,
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
            error = set_adapter_factors(layer, adapter, A, B, A, B, device=here)
            record.initial_factors[name] = (A.detach().cpu().clone(), B.detach().cpu().clone())
            release_freed_memory()
            record.report.append(report_entry(name, weight, r, scaling, ran[0], SpectrumStats.from_tensor(stats),
                                              error))
    record.measured["init_seconds"] = time.perf_counter() - start
    record.measured["workers"] = workers
    warn_zero_components(record, null_space)


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
    norm = float(torch.linalg.norm(weight.detach().double()))
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
