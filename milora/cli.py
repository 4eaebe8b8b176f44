"""The `milora` command line: `milora init`, `milora train`, `milora eval`."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milora", description="MiLoRA fine-tuning for Hugging Face models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_init_command(subparsers)
    _add_train_command(subparsers)
    _add_eval_command(subparsers)
    return parser


def _add_init_command(subparsers) -> None:
    raise NotImplementedError  # being written by the core session


def _add_train_command(subparsers) -> None:
    raise NotImplementedError  # to be written by the training helper


def _add_eval_command(subparsers) -> None:
    raise NotImplementedError  # to be written by the evaluation helper


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
