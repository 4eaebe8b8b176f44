"""The `milora` command line: `milora init`, `merge`, `train`, `eval`, `analyze`, `demo`."""

from __future__ import annotations

import argparse
import sys

from milora.linalg.decomposition import SOLVERS
from milora.initialization import INIT_MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milora", description="MiLoRA fine-tuning for Hugging Face models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_init_command(subparsers)
    _add_merge_command(subparsers)
    _add_train_command(subparsers)
    _add_demo_command(subparsers)
    _add_eval_command(subparsers)
    _add_analyze_command(subparsers)
    return parser


PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _add_init_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "init",
        help="initialise an adapter offline from a model directory and save it",
        description="Decompose each target weight and save the initial adapter (the paper's svd_init step).",
    )
    parser.add_argument("model", nargs="?", default=None, help="model directory or hub id (default: embedded SmolLM2)")
    parser.add_argument("--output", required=True, help="directory to create for the adapter")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64, the paper's math setting)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: equal to the rank)")
    parser.add_argument("--target-modules", default=",".join(PAPER_TARGETS), help="comma-separated module names")
    parser.add_argument("--init", default="milora", choices=list(INIT_MODES))
    parser.add_argument("--solver", default="auto", choices=list(SOLVERS))
    parser.add_argument("--workers", type=int, default=None,
                        help="CPU weights decomposed at once, one BLAS thread each (default: one per thread, at most 4, "
                             "when every weight is below 2048; else 1)")
    parser.add_argument("--device", default=None, help="where the decompositions run (cpu, cuda, ...)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init")
    parser.add_argument("--save-residual", action="store_true", help="also write the residual model + rank-r adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(handler=_run_init)


def _run_init(args) -> int:
    import json
    from pathlib import Path

    import torch
    from peft import LoraConfig

    from milora.initialization import get_model
    from milora.models import load_causal_lm
    from milora.persistence import save_adapter

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {output} already exists and is not empty; choose another --output or pass --overwrite.")
    model = load_causal_lm(args.model, dtype=args.dtype)
    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else args.rank,
        target_modules=[name.strip() for name in args.target_modules.split(",") if name.strip()],
        use_rslora=args.rslora,
        task_type="CAUSAL_LM",
    )
    probe = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe).logits.double()
    try:
        peft_model = get_model(model, lora_config, init=args.init, solver=args.solver, device=args.device, seed=args.seed,
                               workers=args.workers)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    with torch.no_grad():
        after = peft_model(probe).logits.double()
    record = peft_model.milora_init
    record.measured["output_relative_error"] = float((after - before).norm() / before.norm())
    save_adapter(peft_model, output, overwrite=args.overwrite, save_residual=args.save_residual)
    print(json.dumps(record.summary(), indent=2))
    print(f"adapter saved to {output} (rank-{2 * args.rank if args.init != 'lora' else args.rank} LoRA on the original base)")
    return 0


def _add_merge_command(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="fold a saved adapter into the base model and save the full model")
    parser.add_argument("adapter", help="adapter directory written by milora")
    parser.add_argument("--model", default=None, help="original base model (default: embedded SmolLM2)")
    parser.add_argument("--output", required=True, help="directory to create for the merged model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.set_defaults(handler=_run_merge)


def _run_merge(args) -> int:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from milora.models import load_causal_lm, load_tokenizer, resolve_model_path
    from milora.persistence import load_model

    output = Path(args.output)
    if output.exists():
        raise SystemExit(f"error: {output} already exists; choose another --output.")
    model = load_causal_lm(args.model, dtype=args.dtype)
    try:
        merged = load_model(model, args.adapter).merge_and_unload()
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    source = Path(resolve_model_path(args.model))
    has_tokenizer = not source.is_dir() or any((source / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        if has_tokenizer:  # keep the merged directory self-contained when the base has a tokenizer
            load_tokenizer(args.model).save_pretrained(staging)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"merged model saved to {output}")
    return 0


def _add_train_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune an adapter from a YAML config",
        description="Fine-tune a MiLoRA/PiSSA/LoRA adapter. CONFIG is a YAML file of keys (see --list-keys); "
        "key=value arguments override it. For several GPUs: accelerate launch -m milora.cli train CONFIG "
        "(or torchrun -m milora.cli train CONFIG).",
    )
    parser.add_argument("config", nargs="?", help="YAML file describing the run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a key of the config (value parsed as YAML)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and exit")

    def run(args) -> int:
        from accelerate import PartialState

        from milora.config import ConfigError, key_help
        from milora.data import DataError
        from milora.training import train

        if args.list_keys:
            for key, kind, default, text in key_help():
                print(f"{key:<30} {kind:<8} default={default!r:<28} {text}")
            return 0
        if args.config is None:
            parser.error("give a CONFIG file (or --list-keys)")
        try:
            result = train(args.config, args.overrides)
        except (ConfigError, DataError) as error:
            print(f"milora train: error: {error}", file=sys.stderr)
            return 2
        if result.interrupted:
            return 130
        if PartialState().is_main_process:
            print(f"milora train: adapter saved to {result.adapter_dir} (metrics in {result.adapter_dir / 'metrics.json'})")
        return 0

    parser.set_defaults(handler=run)


def _add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune the embedded SmolLM2 with MiLoRA on a reasoning-gym task and report before/after accuracy",
    )
    parser.add_argument("--output", default="runs/demo", help="directory for the data, adapter and report (default runs/demo)")
    parser.add_argument("--task", default=None, help="reasoning-gym dataset name (default: chain_sum with short sums)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out items scored before and after")
    parser.add_argument("--seed", type=int, default=0)

    def run(args) -> int:
        from milora.demo import run_demo

        options = {key: value for key, value in (("task", args.task), ("max_steps", args.steps), ("eval_size", args.eval_size)) if value is not None}
        try:
            run_demo(args.output, seed=args.seed, **options)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        return 0

    parser.set_defaults(handler=run)


def _add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a base model or adapter: gsm8k, math, commonsense, forgetting, lm-eval:<tasks>",
        description="Evaluate with the paper's protocols and write a results JSON (summary + per-item records); "
        "or, with --compare, print saved results side by side.",
    )
    parser.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2)")
    parser.add_argument("--adapter", default=None, help="adapter directory saved by milora (or any PEFT LoRA)")
    parser.add_argument("--task", help="gsm8k, math, commonsense, forgetting, or lm-eval:<task,...>")
    parser.add_argument(
        "--data",
        help="data file or directory (commonsense: LLM-Adapters file or <task>/test.json dirs; forgetting: "
        "text/JSONL file or hub name, default the offline Wikipedia summaries; lm-eval: dir of task YAMLs)",
    )
    parser.add_argument("--limit", type=int, default=None, help="items per dataset (forgetting: text windows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=None, help="results JSON (default: <label>-<task>.json)")
    parser.add_argument("--scorer", default="generate", choices=["generate", "loglik"], help="commonsense scoring")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 512 for math, 32 for commonsense")
    parser.add_argument("--max-length", type=int, default=1024, help="forgetting window in tokens")
    parser.add_argument("--base-model", default=None, help="forgetting: the original base of a merged --model")
    parser.add_argument("--label", default=None, help="method name in results and --compare (default: adapter/model name)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS", help="print result files as the paper's table")

    def run_eval(args) -> int:
        from pathlib import Path

        from milora.evaluation import compare, evaluate, format_summary, write_results
        from milora.grading import DataError
        from milora.models import EMBEDDED_MODEL, load_base_model

        try:
            if args.compare:
                print(compare(args.compare))
                return 0
            if not args.task:
                parser.error("give --task (or --compare RESULTS...)")
            model, tokenizer = load_base_model(args.model, dtype=args.dtype, device=args.device)
            base = None
            if args.task == "forgetting" and (args.adapter or args.base_model):
                base, _ = load_base_model(args.base_model or args.model, dtype=args.dtype, device=args.device)
            if args.adapter:
                from peft import PeftModel

                from milora import load_model
                from milora.persistence import is_plain_peft_adapter

                if is_plain_peft_adapter(args.adapter):
                    model = PeftModel.from_pretrained(model, args.adapter).eval()
                else:
                    model = load_model(model, args.adapter)  # a milora adapter (or a clear error)
            label = args.label or Path(args.adapter or args.model or EMBEDDED_MODEL).name
            result = evaluate(
                model, tokenizer, args.task, args.data, limit=args.limit, batch_size=args.batch_size,
                scorer=args.scorer, max_new_tokens=args.max_new_tokens, base_model=base,
                max_length=args.max_length, label=label,
                metadata={"model": args.model or EMBEDDED_MODEL, "adapter": args.adapter},
            )
            slug = args.task.replace(":", "-").replace(",", "+")
            output = write_results(result, args.output or f"{label}-{slug}.json")
        except (DataError, FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        print(format_summary(result))
        print(f"results written to {output}")
        return 0

    parser.set_defaults(handler=run_eval)


def _add_analyze_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="measure what fine-tuning changed: each update against the weight's principal and minor subspaces",
        description="For every adapted weight W and its update Delta W: the share of Delta W in W's top-k and "
        "bottom-k singular subspaces, the amplification factor, and how far the top-k subspace rotated "
        "(see milora.analysis). Several adapters are compared side by side.",
    )
    parser.add_argument("adapters", nargs="+", help="adapter directories saved by milora (or plain PEFT LoRA)")
    parser.add_argument("--model", default=None, help="the ORIGINAL base model (default: embedded SmolLM2)")
    parser.add_argument("--rank", type=int, default=None, help="size k of the compared subspaces (default: adapter rank)")
    parser.add_argument("--output", default=None, help="write the per-layer results as JSON")
    parser.add_argument("--plot", default=None, help="write per-layer curves as an image (e.g. analysis.png)")
    parser.add_argument("--device", default=None, help="where the decompositions run (cpu, cuda, ...)")
    parser.add_argument("--labels", default=None, help="comma-separated names, one per adapter (default: directory names)")

    def run_analyze(args) -> int:
        from pathlib import Path

        from milora.analysis import analyze_adapter, format_analysis, plot_analysis
        from milora.evaluation import write_results
        from milora.models import load_causal_lm

        for adapter in args.adapters:  # fail before the slow part, and before writing anything
            if not Path(adapter).is_dir():
                raise SystemExit(f"error: adapter directory {adapter} does not exist.")
        if args.rank is not None and args.rank < 1:
            raise SystemExit(f"error: --rank must be a positive integer, got {args.rank}.")
        labels = args.labels.split(",") if args.labels is not None else [None] * len(args.adapters)
        if len(labels) != len(args.adapters):
            raise SystemExit(f"error: --labels has {len(labels)} names for {len(args.adapters)} adapters.")
        if args.plot is not None:
            from matplotlib.figure import Figure

            formats = Figure().canvas.get_supported_filetypes()
            if Path(args.plot).suffix.lstrip(".").lower() not in formats:
                raise SystemExit(f"error: --plot {args.plot}: use one of the extensions {', '.join(sorted(formats))}.")
        results = []
        for adapter, label in zip(args.adapters, labels):
            try:
                model = load_causal_lm(args.model, device=args.device)  # PEFT wraps it in place: a fresh copy each
                results.append(analyze_adapter(model, adapter, rank=args.rank, label=label))
            except (ValueError, FileNotFoundError) as error:
                raise SystemExit(f"error: {error}") from None
        print(format_analysis(results))
        if args.output:
            print(f"results written to {write_results(results, args.output)}")
        if args.plot:
            print(f"plot written to {plot_analysis(results, args.plot)}")
        return 0

    parser.set_defaults(handler=run_analyze)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
