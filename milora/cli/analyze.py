"""`milora analyze`: what each saved adapter's update changed in its weights' principal and minor subspaces."""

from __future__ import annotations


def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="measure what fine-tuning changed: each update against the weight's principal and minor subspaces",
        description="For every adapted weight W and its update Delta W: the share of Delta W in W's top-k and "
        "bottom-k singular subspaces, the amplification factor, and how far the top-k subspace rotated "
        "(see milora.analysis). Several adapters are compared side by side.",
    )
    parser.add_argument("adapters", nargs="+", help="adapter directories saved by milora (or plain PEFT LoRA)")
    parser.add_argument("--model", default=None, help="the ORIGINAL base model (default: embedded SmolLM2)")
    parser.add_argument("--rank", type=int, default=None,
                        help="size k of the compared subspaces (default: adapter rank)")
    parser.add_argument("--output", default=None, help="write the per-layer results as JSON")
    parser.add_argument("--plot", default=None, help="write per-layer curves as an image (e.g. analysis.png)")
    parser.add_argument("--device", default=None, help="where the decompositions run (cpu, cuda, ...)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated names, one per adapter (default: directory names)")
    parser.set_defaults(handler=_run_analyze)


def _check_analyze_args(args) -> list:
    """Fail before the slow part, and before writing anything; returns the labels."""
    from pathlib import Path

    from milora.errors import AdapterNotFoundError, UsageError
    from milora.io import check_output_file

    for adapter in args.adapters:
        if not Path(adapter).is_dir():
            raise AdapterNotFoundError(f"adapter directory {adapter} does not exist.")
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {args.rank}.")
    labels = args.labels.split(",") if args.labels is not None else [None] * len(args.adapters)
    if len(labels) != len(args.adapters):
        raise UsageError(f"--labels has {len(labels)} names for {len(args.adapters)} adapters.")
    for path in (args.output, args.plot):
        if path is not None:
            check_output_file(path)
    if args.plot is not None:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if Path(args.plot).suffix.lstrip(".").lower() not in formats:
            raise UsageError(f"--plot {args.plot}: use one of the extensions {', '.join(sorted(formats))}.")
    return labels


def _run_analyze(args) -> int:
    from milora.analysis import analyze_adapter, format_analysis, plot_analysis
    from milora.models import load_pretrained_model
    from milora.report import write_results

    labels = _check_analyze_args(args)
    results = []
    for adapter, label in zip(args.adapters, labels, strict=True):
        model = load_pretrained_model(args.model, device=args.device)  # PEFT wraps it in place: a fresh copy each
        results.append(analyze_adapter(model, adapter, rank=args.rank, label=label))
    print(format_analysis(results))
    if args.output:
        print(f"results written to {write_results(results, args.output)}")
    if args.plot:
        print(f"plot written to {plot_analysis(results, args.plot)}")
    return 0
