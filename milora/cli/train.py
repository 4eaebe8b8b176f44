"""`milora train`: one fine-tuning run from a YAML config (key=value overrides)."""

from __future__ import annotations


def add(subparsers) -> None:
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
            from milora.adapter.serving import serve_hint

            print(f"milora train: adapter saved to {result.adapter_dir} "
                  f"(metrics in {result.adapter_dir / 'metrics.json'})")
            print(serve_hint([result.adapter_dir]))
        return 0

    parser.set_defaults(handler=run)
