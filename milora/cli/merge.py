"""`milora merge`: fold a saved adapter into its original base and save the full model."""

from __future__ import annotations

from milora.constants import DTYPE_NAMES


def add(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="fold a saved adapter into the base model and save the full model")
    parser.add_argument("adapter", help="adapter directory written by milora")
    parser.add_argument("--model", default=None, help="original base model (default: embedded SmolLM2)")
    parser.add_argument("--output", required=True, help="directory to create for the merged model")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    parser.set_defaults(handler=_run_merge)


def _run_merge(args) -> int:
    from pathlib import Path

    from milora.adapter.load import load_model
    from milora.errors import OutputExistsError
    from milora.io import check_output_dir, staged_directory
    from milora.models import (
        is_vision_language_model,
        load_pretrained_model,
        load_processor,
        load_tokenizer,
        refuse_quantized_checkpoint,
        resolve_model_path,
    )

    output = Path(args.output)
    if output.exists():
        raise OutputExistsError(f"{output} already exists; choose another --output.")
    check_output_dir(output)  # before the model loads
    refuse_quantized_checkpoint(args.model, "merge needs the full-precision base the adapter belongs to (an adapter "
                                 "trained on a quantised base is saved for the full-precision one, and merging into "
                                 "quantised weights would round the update away)")
    model = load_pretrained_model(args.model, dtype=args.dtype)
    merged = load_model(model, args.adapter).merge_and_unload()
    source = Path(resolve_model_path(args.model))
    has_tokenizer = not source.is_dir() or any((source / f).exists()
                                               for f in ("tokenizer.json", "tokenizer_config.json"))
    with staged_directory(output) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        if has_tokenizer:  # keep the merged directory self-contained: tokenizer, or processor for image-text-to-text
            (load_processor if is_vision_language_model(model) else load_tokenizer)(args.model).save_pretrained(staging)
    print(f"merged model saved to {output}")
    return 0
