"""`milora train` (one run from a YAML config) and `milora demo` (the embedded end-to-end demo)."""

from __future__ import annotations


def add(subparsers) -> None:
    _add_train(subparsers)
    _add_demo(subparsers)
    _add_vqa_demo(subparsers)


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune an adapter from a YAML config",
        description="Fine-tune a MiLoRA/PiSSA/LoRA adapter. CONFIG is a YAML file of keys (see --list-keys); "
        "key=value arguments override it. For several GPUs: accelerate launch -m milora.cli train CONFIG "
        "(or torchrun -m milora.cli train CONFIG).",
    )
    parser.add_argument("config", nargs="?", help="YAML file describing the run")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a key of the config (value parsed as YAML)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its default and exit")

    def run(args) -> int:
        if args.list_keys:
            from milora.training.config import key_help

            for key, kind, default, text in key_help():
                print(f"{key:<30} {kind:<8} default={default!r:<28} {text}")
            return 0
        if args.config is None:
            parser.error("give a CONFIG file (or --list-keys)")
        from accelerate import PartialState

        from milora.training.run import train

        result = train(args.config, args.overrides)
        if result.interrupted:
            return 130
        if PartialState().is_main_process:
            print(f"milora train: adapter saved to {result.adapter_dir} "
                  f"(metrics in {result.adapter_dir / 'metrics.json'})")
        return 0

    parser.set_defaults(handler=run)


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune the embedded SmolLM2 with MiLoRA on a reasoning-gym task and report before/after accuracy",
    )
    parser.add_argument("--output", default="runs/demo",
                        help="directory for the data, adapter and report (default runs/demo)")
    parser.add_argument("--task", default=None, help="reasoning-gym dataset name (default: chain_sum with short sums)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--eval-size", type=int, default=None, help="held-out items scored before and after")
    parser.add_argument("--seed", type=int, default=0)

    def run(args) -> int:
        from milora.demo import run_demo

        chosen = (("task", args.task), ("max_steps", args.steps), ("eval_size", args.eval_size))
        run_demo(args.output, seed=args.seed, **{key: value for key, value in chosen if value is not None})
        return 0

    parser.set_defaults(handler=run)


def _add_vqa_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo-vqa",
        help="visual instruction tuning of a miniature LLaVA (embedded SmolLM2 + random CLIP tower) on easy-VQA, "
             "accuracy before/after against the majority-answer baseline",
    )
    parser.add_argument("--output", default="runs/vqa_demo", help="directory for the model, data, adapter and report")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 120)")
    parser.add_argument("--train-size", type=int, default=None, help="training questions (default 2000)")
    parser.add_argument("--eval-size", type=int, default=None,
                        help="test questions scored before and after (default 400)")
    parser.add_argument("--seed", type=int, default=0)

    def run(args) -> int:
        from milora.vqa_demo import run_vqa_demo

        chosen = (("max_steps", args.steps), ("train_size", args.train_size), ("eval_size", args.eval_size))
        run_vqa_demo(args.output, seed=args.seed, **{key: value for key, value in chosen if value is not None})
        return 0

    parser.set_defaults(handler=run)
