"""`milora demo` and `milora demo-vqa`: the embedded end-to-end demonstrations."""

from __future__ import annotations


def add(subparsers) -> None:
    _add_demo(subparsers)
    _add_vqa_demo(subparsers)


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
        from milora.demos.text import run_demo

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
        from milora.demos.vqa import run_vqa_demo

        chosen = (("max_steps", args.steps), ("train_size", args.train_size), ("eval_size", args.eval_size))
        run_vqa_demo(args.output, seed=args.seed, **{key: value for key, value in chosen if value is not None})
        return 0

    parser.set_defaults(handler=run)
