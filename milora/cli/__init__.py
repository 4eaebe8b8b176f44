"""The `milora` command line: `init`, `merge`, `train`, `eval`, `analyze`, `compare`, `demo`, `demo-vqa`.

Each command lives in a module of this package with ``add(subparsers)``; heavy libraries
(torch, transformers, peft) are imported inside the commands, so ``--help`` starts fast.
Every error a user can fix is a `milora.errors.MiloraError`: printed once here as
``milora <command>: error: <message>``, exit status 2; an I/O failure (a full disk, a read-only
mount, a permission: `OSError`, safetensors' error) likewise, exit status 1; with ``--debug`` (or
``MILORA_DEBUG=1``) the traceback, chained causes included, comes first.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from milora.cli import analyze, compare, demo, eval, init, merge, train
from milora.errors import MiloraError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milora", description="MiLoRA fine-tuning for Hugging Face models.")
    parser.add_argument("--debug", action="store_true", default=os.environ.get("MILORA_DEBUG", "") not in ("", "0"),
                        help="on an error, print the traceback with its causes (also: MILORA_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in (init, merge, train, eval, analyze, compare, demo):
        command.add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MiloraError as error:
        if args.debug:
            traceback.print_exception(error, file=sys.stderr)
        print(f"milora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` & co., which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, *_loaded_safetensors_error()) as error:  # a full disk, a read-only mount, a permission
        if args.debug:
            traceback.print_exception(error, file=sys.stderr)
        print(f"milora {args.command}: error: cannot read or write a file: {error} (outputs are staged and renamed "
              "into place, so nothing that existed was replaced)", file=sys.stderr)
        return 1


def _loaded_safetensors_error() -> tuple[type[Exception], ...]:
    """safetensors' own I/O error (a full disk while saving), if safetensors is loaded (never imported here)."""
    module = sys.modules.get("safetensors")
    return (module.SafetensorError,) if module is not None and hasattr(module, "SafetensorError") else ()


if __name__ == "__main__":
    sys.exit(main())
