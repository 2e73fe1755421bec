"""The CLI surface: --method selection, --model rewriting, clear errors, exit codes."""

import pytest
import yaml

from pmetal.cli import main
from pmetal.cli.lightning import rewrite_model_flag, run_lightning_cli


def test_model_flag_names_the_model():
    assert rewrite_model_flag(["--model", "Qwen/Qwen3-0.6B", "--model.lora_r", "8"]) == [
        "--model.model", "Qwen/Qwen3-0.6B", "--model.lora_r", "8"]
    assert rewrite_model_flag(["--model=x.gguf"]) == ["--model.model", "x.gguf"]
    assert rewrite_model_flag(["--model", "cfg.yaml"]) == ["--model", "cfg.yaml"]


def test_fit_print_config_shows_method_settings(capsys):
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--method", "sft", "--model", "some/model", "--model.lora_r", "8", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["method"] == "sft"
    assert config["model"]["model"] == "some/model"
    assert config["model"]["lora_r"] == 8
    assert config["model"]["lora_alpha"] is None  # None means 2 × rank
    assert config["trainer"]["gradient_clip_val"] == 1.0


def test_unknown_method_is_a_clear_error(capsys):
    assert main(["fit", "--method", "ppo"]) == 2
    err = capsys.readouterr().err
    assert "unknown --method 'ppo'" in err and "dpo" in err and "grpo" in err


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    assert main(["train", "--model", str(tmp_path / "nope"), "--max-steps", "1"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_gguf_and_directory_errors(tmp_path):
    from pmetal.errors import PmetalError
    from pmetal.models import resolve_model

    with pytest.raises(PmetalError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(PmetalError, match="without config.json"):
        resolve_model(str(tmp_path))
    assert resolve_model("org/name") == ("org/name", None)


def test_cli_turns_on_expandable_segments_unless_configured(monkeypatch):
    from pmetal.cli import dispatch as cli

    monkeypatch.setattr(cli.sys, "platform", "linux")
    for name in cli.ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cli.main([]) == 0  # prints the help
    assert cli.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")
    cli.configure_cuda_allocator()
    assert cli.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    cli.configure_cuda_allocator()  # PYTORCH_ALLOC_CONF="" is the user's choice too
    assert "PYTORCH_CUDA_ALLOC_CONF" not in cli.os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setattr(cli.sys, "platform", "darwin")  # MPS has its own allocator
    cli.configure_cuda_allocator()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in cli.os.environ


def test_compile_scope_flag_reaches_the_module_settings():
    import argparse

    from pmetal.cli.commands import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    module_kwargs = lambda args: train.FLAGS.resolve(args).model  # noqa: E731
    assert module_kwargs(parser.parse_args([]))["compile_scope"] == "layers"
    assert module_kwargs(parser.parse_args(["--compile", "--compile-scope", "model"]))["compile_scope"] == "model"
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile-scope", "everything"])
