"""`milora compare`: the method comparison of one sweep YAML (see milora.comparison)."""

from __future__ import annotations


def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare init methods fairly: a learning-rate grid per method x seeds, chosen on validation",
        description="Train every method at every learning rate with every seed (a normal milora train run each), "
        "choose each method's rate on the validation split, and report test accuracy with 95%% intervals, the "
        "paired difference to the baseline, forgetting and plots in OUTPUT_DIR (compare.md, compare.json, *.png). "
        "Re-running the same command continues an interrupted sweep.",
    )
    parser.add_argument("sweep", nargs="?", help="YAML file describing the sweep")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override a sweep key (train.key=value for a shared train key); values parsed as YAML")
    parser.add_argument("--list-keys", action="store_true", help="print every sweep key with its default and exit")

    def run(args) -> int:
        if args.list_keys:
            from milora.comparison.sweep import SweepConfig

            for key, info in SweepConfig.model_fields.items():
                default = "required" if info.is_required() else f"default={info.default!r}"
                print(f"{key:<20} {default:<32} {info.description}")
            return 0
        if args.sweep is None:
            parser.error("give a SWEEP file (or --list-keys)")
        from milora.comparison import compare

        summary = compare(args.sweep, args.overrides)
        chosen = _chosen_adapters(summary)
        if chosen:
            from milora.adapter.serving import serve_hint

            print(serve_hint(list(chosen.values()), names=list(chosen)))
        return 0

    parser.set_defaults(handler=run)


def _chosen_adapters(summary: dict) -> dict[str, str]:
    """Served name -> adapter directory of each method's chosen run (its chosen rate, first seed)."""
    chosen = {}
    for method in summary["methods"]:
        runs = sorted((r for r in summary["runs"] if r["method"] == method["method"] and r["status"] == "done"
                       and r["learning_rate"] == method.get("selected_learning_rate") and r.get("adapter_dir")),
                      key=lambda r: r["seed"])
        if runs:
            chosen[f"{method['method']}-lr{runs[0]['learning_rate']:g}-seed{runs[0]['seed']}"] = runs[0]["adapter_dir"]
    return chosen
