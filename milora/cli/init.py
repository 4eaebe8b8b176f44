"""`milora init`: decompose every target weight offline and save the initial adapter (the paper's svd_init step)."""

from __future__ import annotations

from milora.constants import (
    DATA_INITS,
    DTYPE_NAMES,
    INIT_MODES,
    PAPER_TARGETS,
    PEFT_STARTS,
    QUANTIZATIONS,
    RESIDUAL_INITS,
    SOLVERS,
    TARGET_SCOPES,
)


def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "init",
        help="initialise an adapter offline from a model directory and save it",
        description="Decompose each target weight and save the initial adapter (the paper's svd_init step).",
    )
    parser.add_argument("model", nargs="?", default=None, help="model directory or hub id (default: embedded SmolLM2)")
    parser.add_argument("--output", required=True, help="directory to create for the adapter")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64, the paper's math setting)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: equal to the rank)")
    parser.add_argument("--target-modules", default=",".join(PAPER_TARGETS),
                        help="comma-separated module names (or all-linear); a MoE model's fused expert parameters "
                             "too (gate_up_proj, down_proj: each expert its own start); on an image-text-to-text "
                             "model, names in its language model (see --target-scope)")
    parser.add_argument("--target-scope", default="language_model", choices=list(TARGET_SCOPES),
                        help="image-text-to-text models: adapt the named modules of the language model only (default), "
                             "or wherever they are (vision tower too)")
    parser.add_argument("--modules-to-save", default=None,
                        help="comma-separated modules trained in full and saved with the adapter "
                             "(e.g. multi_modal_projector, LLaVA's projector)")
    parser.add_argument("--init", default="milora", choices=[mode for mode in INIT_MODES if mode not in DATA_INITS],
                        help="the start (PEFT's data starts corda-kpm, corda-ipm, eva, lora-ga need training data: "
                             "use milora train)")
    parser.add_argument("--pissa-niter", type=int, default=4,
                        help="pissa-fast: subspace iterations of the randomised SVD (PEFT's pissa_niter_N)")
    parser.add_argument("--solver", default="auto", choices=list(SOLVERS))
    parser.add_argument("--workers", type=int, default=None,
                        help="CPU weights decomposed at once, one BLAS thread each (default: one per thread, "
                             "at most 4, when every weight is below 2048; else 1)")
    parser.add_argument("--device", default=None, help="where the decompositions run (cpu, cuda, ...)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPE_NAMES),
                        help="dtype the weights are read in (default: float32 in memory; streaming: the "
                             "checkpoint's own, which the residual keeps; the factors are the same either way)")
    parser.add_argument("--in-memory", action="store_true",
                        help="load the whole model first (the default for hub ids, --quantize, init lora and "
                             "PEFT's starts); "
                             "by default a local safetensors checkpoint is streamed one weight at a time")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init")
    parser.add_argument("--null-space", default="zero", choices=["zero", "random"],
                        help="start of exactly-zero selected singular values (rank-deficient weights): zero, "
                             "the paper's (those directions cannot train), or random inside the null space, "
                             "as LoRA (B = 0)")
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZATIONS),
                        help="QLoRA-style: quantise the frozen base with bitsandbytes after the full-precision init "
                             "(W - s B0 A0 in the targets) and report the quantisation error per weight; the saved "
                             "adapter is still for the full-precision base")
    parser.add_argument("--save-residual", action="store_true", help="also write the residual model + rank-r adapter")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory, if it is an adapter milora wrote")
    parser.set_defaults(handler=_run_init)


def _run_init(args) -> int:
    from pathlib import Path

    import torch

    from milora.adapter.save import save_adapter
    from milora.errors import OutputExistsError, UsageError
    from milora.init import get_model, init_record
    from milora.init.quantize import check_quantization
    from milora.io import check_output_dir, check_replaceable
    from milora.models import load_pretrained_model, refuse_quantized_checkpoint

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"{output} is a file, not a directory: choose another --output for the adapter.")
    check_output_dir(output)  # before any weight is decomposed
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not args.overwrite:
            raise OutputExistsError(f"{output} already exists and is not empty; "
                                    "choose another --output or pass --overwrite.")
        check_replaceable(output)
    check_quantization(args.quantize)
    if args.init == "loftq":
        from milora.init.loftq import loftq_problem

        if problem := loftq_problem(args.quantize):
            raise UsageError(problem.replace("set quantization:", "pass --quantize"))
    if args.init != "pissa-fast" and args.pissa_niter != 4:
        raise UsageError(f"--pissa-niter is for --init pissa-fast; init {args.init} ignores it: remove it.")
    if args.quantize and args.save_residual:
        raise UsageError("--save-residual writes the residual model in full precision: it cannot be combined with "
                         "--quantize (the saved adapter loads onto the full-precision base either way).")
    refuse_quantized_checkpoint(args.model, "decomposes full-precision weights; --quantize quantises the residual "
                                 "after the init")
    streaming = (not args.in_memory and args.model is not None and Path(args.model).is_dir()
                 and args.init not in ("lora", *PEFT_STARTS) and args.quantize is None)
    if streaming:
        return _stream(args, output)
    model = load_pretrained_model(args.model, dtype=args.dtype or "float32")
    lora_config = _lora_config(args, model)
    vocab_size = model.config.get_text_config().vocab_size
    probe = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe).logits.double()
    extra = {"pissa_niter": args.pissa_niter} if args.init in PEFT_STARTS else {}
    peft_model = get_model(model, lora_config, init=args.init, solver=args.solver, device=args.device, seed=args.seed,
                           workers=args.workers, null_space=args.null_space, quantization=args.quantize, **extra)
    with torch.no_grad():
        after = peft_model(probe).logits.double()
    record = init_record(peft_model)
    record.measured["output_relative_error"] = float((after - before).norm() / before.norm())
    save_adapter(peft_model, output, overwrite=args.overwrite, save_residual=args.save_residual)
    _print_result(record, args, output)
    return 0


def _lora_config(args, model):
    """The LoraConfig the options describe, with the targets scoped on ``model`` (in memory or on the meta device)."""
    from peft import LoraConfig

    from milora.init.experts import select_targets

    names = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    targets = select_targets(model, names, args.target_scope)
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else args.rank,
        target_modules=targets.modules,
        target_parameters=targets.parameters,
        modules_to_save=[name.strip() for name in (args.modules_to_save or "").split(",") if name.strip()] or None,
        use_rslora=args.rslora,
        task_type="CAUSAL_LM",
    )


def _stream(args, output) -> int:
    """The streaming init (`milora.init.streaming`): one weight at a time, resumable, the model never built."""
    from milora.adapter.save import save_streamed_start
    from milora.init.streaming import stream_init
    from milora.models import DTYPES, meta_model

    model = meta_model(args.model)
    streamed = stream_init(args.model, model, _lora_config(args, model), output, init=args.init, solver=args.solver,
                           seed=args.seed, null_space=args.null_space, workers=args.workers, device=args.device,
                           dtype=DTYPES[args.dtype] if args.dtype else None, save_residual=args.save_residual)
    save_streamed_start(streamed, output, overwrite=args.overwrite)
    _print_result(streamed.record, args, output)
    return 0


def _print_result(record, args, output) -> None:
    import json

    print(json.dumps(record.summary(), indent=2))
    print(f"adapter saved to {output} "
          f"(rank-{2 * args.rank if args.init in RESIDUAL_INITS else args.rank} LoRA on the original base)")
    from milora.adapter.serving import serve_hint

    print(serve_hint([output]))
