"""One place for each small thing (issue 12 §3): constants, the end-of-turn list, the method list."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for folder in ("pmetal", "modules", "callbacks") for p in sorted((ROOT / folder).rglob("*.py"))]


def _is_minus_100(node: ast.AST) -> bool:
    return (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant) and node.operand.value == 100) or (
        isinstance(node, ast.Constant) and node.value == -100 and not isinstance(node.value, bool))


def test_ignore_index_is_stated_once_and_never_bare():
    defined, bare = [], []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE_INDEX" for t in node.targets):
                defined.append(path.relative_to(ROOT).as_posix())
            elif _is_minus_100(node):
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert defined == ["pmetal/tokens.py"]
    assert [where.split(":")[0] for where in bare] == ["pmetal/tokens.py"], bare  # its one definition


class _Tokenizer:
    """Just enough of a tokenizer for the stop-token and end-of-turn lookups."""

    def __init__(self, vocab, template, eos="</s>"):
        self.vocab, self.chat_template, self.eos_token = vocab, template, eos
        self.eos_token_id, self.pad_token_id = vocab[eos], None

    def get_vocab(self):
        return self.vocab


def test_one_end_of_turn_list_for_training_targets_and_rollout_stops():
    from pmetal.data.render import end_of_turn_markers
    from pmetal.generation.sampling import stop_token_ids
    from pmetal.tokens import END_OF_TURN_TOKENS

    # Llama 3's base EOS ends a turn; Mistral's [/TOOL_RESULTS] closes a tool result, after which the
    # assistant speaks: it must neither stop a rollout nor end a training target
    vocab = {"</s>": 0, "<|end_of_text|>": 1, "[/TOOL_RESULTS]": 2, "<｜end▁of▁sentence｜>": 3, "hello": 4}
    template = "{{ '[TOOL_RESULTS]' + x + '[/TOOL_RESULTS]' }}{{ y + '<|end_of_text|>' }}{{ '<｜end▁of▁sentence｜>' }}"
    tokenizer = _Tokenizer(vocab, template)
    assert stop_token_ids(tokenizer) == [0, 1, 3]
    assert end_of_turn_markers(tokenizer) == ["</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"]
    assert "[/TOOL_RESULTS]" not in END_OF_TURN_TOKENS
    # every listed token is both a stop (when in the vocabulary) and a marker (when in the template)
    everything = _Tokenizer({t: k for k, t in enumerate(END_OF_TURN_TOKENS)}, "".join(END_OF_TURN_TOKENS))
    assert stop_token_ids(everything) == list(range(len(END_OF_TURN_TOKENS)))
    assert sorted(end_of_turn_markers(everything)) == sorted(END_OF_TURN_TOKENS)


def test_help_lists_the_methods_of_the_method_table():
    from pmetal.cli.dispatch import build_parser
    from pmetal.cli.methods import METHODS

    epilog = build_parser().epilog
    assert f"(methods: {', '.join(METHODS)})" in epilog
    source = (ROOT / "pmetal" / "cli" / "dispatch.py").read_text()
    assert "dpo, simpo" not in source  # not restated by hand


def test_losses_and_callbacks_export_their_public_names_lazily():
    import subprocess
    import sys

    probe = ("import sys, pmetal.losses, pmetal.callbacks; "
             "print(sorted(m for m in ('lightning', 'torch', 'pmetal.losses.preference') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout  # importing the packages loads nothing heavy

    import pmetal.callbacks as callbacks
    import pmetal.losses as losses
    from pmetal.callbacks import RolloutCallback
    from pmetal.callbacks.rollout import RolloutCallback as defined
    from pmetal.losses import dpo_loss
    from pmetal.losses.preference import dpo_loss as dpo_defined

    assert RolloutCallback is defined and dpo_loss is dpo_defined
    for package in (losses, callbacks):
        for name in package.__all__:
            assert getattr(package, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        losses.nothing  # noqa: B018


def test_bitsandbytes_is_imported_only_by_its_compatibility_module():
    importers = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "bitsandbytes" or n.startswith("bitsandbytes.") for n in names):
                importers.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(importers)) == ["pmetal/quant/bnb_compat.py"]


def test_bench_parser_runs_no_file_outside_the_package(monkeypatch):
    import importlib.util

    from pmetal.cli.dispatch import build_parser

    def refuse(*args, **kwargs):
        raise AssertionError(f"building the parser loaded a file: {args}")

    monkeypatch.setattr(importlib.util, "spec_from_file_location", refuse)
    args = build_parser("bench").parse_args(["bench", "--device", "cpu", "--variants", "hf,pmetal", "--rounds", "2"])
    assert (args.device, args.variants, args.rounds) == ("cpu", "hf,pmetal", 2)
    # the script parses its own command line with the same flags
    monkeypatch.undo()
    script_spec = importlib.util.spec_from_file_location("bench_sft_probe", ROOT / "benchmarks" / "bench_sft.py")
    script = importlib.util.module_from_spec(script_spec)
    script_spec.loader.exec_module(script)
    script_args = script.parse_args(["--device", "cpu", "--variants", "hf,pmetal", "--rounds", "2"])
    assert vars(script_args) == {k: v for k, v in vars(args).items() if k not in ("command", "_run")}


def test_a_settings_range_lives_once_for_the_commands_and_the_constructors():
    """pmetal.ranges' table is preflight's, and GRPO/RLKD's constructors refuse out of range values
    with the same rule (no range restated in a constructor)."""
    import pytest

    from pmetal.cli import preflight
    from pmetal.errors import PmetalError
    from pmetal.modules.grpo import GrpoModule
    from pmetal.modules.rlkd import RlkdModule
    from pmetal.ranges import RANGES

    assert preflight.RANGES is RANGES
    for cls, name, bad in ((GrpoModule, "num_generations", 1), (GrpoModule, "tis_cap", 0.0),
                           (GrpoModule, "top_entropy_quantile", 0.0), (GrpoModule, "rollout_chunks", 0),
                           (GrpoModule, "temperature", -1.0), (RlkdModule, "alpha", 1.5)):
        with pytest.raises(PmetalError) as info:
            cls("/nonexistent/model", **{name: bad})  # refused before any model loads
        assert f"{name}={bad}: expected {RANGES[name].describe()}" in str(info.value)
