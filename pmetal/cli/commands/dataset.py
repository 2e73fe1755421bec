"""Check a data file before training: pmetal dataset validate|preview FILE

    pmetal dataset validate data.jsonl [--method M] [--model M] [--max-seq-len 1024]
        the kind of data (SFT conversations, preference pairs, KTO feedback, RL prompts, embedding
        pairs: detected from the columns, or the one --method trains on), every row checked; for
        SFT data also the format, token length stats (min/mean/p95/max), truncated rows,
        loss-token share, and one rendered example with the loss mask shown
    pmetal dataset preview data.jsonl [--n 2]
        the first N rows as written in the file and as the model sees them (loss mask shown)

The tokenizer (and its chat template) is the default model's unless --model names another.
Text inside [[ ]] carries the loss (on a terminal: green text; masked text is dim). With a
vision-language --model, rows carry images (`image`/`images` columns or image content parts):
validate also shows how many tokens each image expands to and where they sit.
"""

from __future__ import annotations

import argparse
import os
import sys

from pmetal.cli.methods import METHODS  # the table names classes by string: importing it is cheap

METHOD_NAMES = tuple(METHODS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", metavar="{validate,preview}", required=True)
    validate = sub.add_parser("validate", help="check a file: format, counts, token lengths, truncation")
    preview = sub.add_parser("preview", help="show the first rows as written and as rendered for training")
    preview.add_argument("--n", type=int, default=2, help="how many rows to show (default: 2)")
    for p in (validate, preview):
        p.add_argument("file", help="a .jsonl/.json/.parquet/.csv file (or a directory of them)")
        p.add_argument("--method", default=None, choices=METHOD_NAMES,
                       help="read the file as the data of this method (default: told from its columns)")
        p.add_argument("--model", default="default", help="whose tokenizer and chat template to use (default: "
                       "SmolLM2-135M-Instruct)")
        p.add_argument("--max-seq-len", type=int, default=1024, help="truncation length to check against")
        p.add_argument("--prompt-column", default=None, help="custom prompt column (with --response-column)")
        p.add_argument("--response-column", default=None, help="custom response column")
        p.add_argument("--system-prompt", default=None, help="system message added to conversations without one")
        p.add_argument("--chat-template", default=None, help="'chatml' for models without a chat template")
        p.add_argument("--train-on-prompt", action="store_true", help="put the loss on prompt tokens too")
        p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                       help="mark the loss with colours instead of [[ ]] (auto: on a terminal)")


def run(args: argparse.Namespace) -> int:
    from pmetal.cli.preflight import check_data_path, check_model_name, check_ranges
    from pmetal.data.inspect import inspect_sft_file
    from pmetal.errors import DataError
    from pmetal.models import load_tokenizer

    check_ranges(args)
    rows = check_data_path(args.file, None)
    kind = _kind(args, rows)
    if kind != "sft":
        return _report_other_kind(args, rows, kind)
    check_model_name(args.model)
    from pmetal.vlm import is_vlm

    image_lines: list[str] = []
    if is_vlm(args.model):
        from pmetal.data.vlm import image_summary_lines, inspect_vlm_file

        report, tokenizer = inspect_vlm_file(args)
        image_lines = image_summary_lines(report.rendered)
    else:
        tokenizer = load_tokenizer(args.model)
        report = inspect_sft_file(
            args.file, tokenizer, max_seq_len=args.max_seq_len, prompt_column=args.prompt_column,
            response_column=args.response_column, system_prompt=args.system_prompt, chat_template=args.chat_template,
            train_on_prompt=args.train_on_prompt,
        )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    usable = len(report.rows) - report.unusable
    if args.dataset_command == "validate":
        print("\n".join(report.summary_lines() + image_lines))
        if report.rendered.rows:
            print(report.example(0, tokenizer, color=color))
        if usable == 0:
            raise DataError(args.file, "no row has a token to learn from",
                            expected=f"assistant answers within max_seq_len={args.max_seq_len}")
        print(f"ok: {usable} rows ready for training")
        return 0
    shown = min(args.n, len(report.rendered.rows))
    print(f"{report.path}: format {report.format}, {len(report.rows)} rows; showing {shown}")
    for k in range(shown):
        source = report.rows[report.rendered.source[k]]
        print(f"\n=== as written: {_short(source)}")
        print(report.example(k, tokenizer, color=color))
    return 0


def _kind(args: argparse.Namespace, rows) -> str:
    from pmetal.cli.methods import get_method
    from pmetal.data.check import detect_kind

    if args.method is not None:
        return get_method(args.method).data_kind
    if rows is None:  # a hub dataset id: read by the SFT report below
        return "sft"
    return detect_kind(rows, path=str(args.file), prompt_column=args.prompt_column,
                       response_column=args.response_column)


def _report_other_kind(args: argparse.Namespace, rows, kind: str) -> int:
    """Data of a non-SFT method: every row checked by the converter its DataModule uses."""
    from pmetal.data.check import KINDS, check_rows
    from pmetal.data.formats import load_rows

    rows = rows if rows is not None else load_rows(args.file)
    layout, usable = check_rows(rows, kind, path=str(args.file), prompt_column=args.prompt_column,
                                system_prompt=args.system_prompt)
    print(f"file:        {args.file}")
    print(f"kind:        {KINDS[kind].describes}" + (f" (read as --method {args.method})" if args.method else ""))
    print(f"format:      {layout}")
    print(f"rows:        {len(rows)} ({usable} usable)")
    if args.dataset_command == "validate":
        print(f"ok: {usable} rows ready for training")
        return 0
    shown = min(args.n, len(rows))
    print(f"showing {shown} as written")
    for k in range(shown):
        print(f"\n=== as written: {_short(rows[k])}")
    return 0


def _short(row: dict, limit: int = 400) -> str:
    import json

    text = json.dumps(row, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
