"""Every YAML in configs/ parses against its method's classes (LightningCLI, no model loaded)."""

from pathlib import Path

import pytest
import yaml

from pmetal.cli.lightning import run_lightning_cli
from pmetal.cli.methods import METHODS

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_every_method_has_a_config():
    names = {p.name for p in CONFIGS}
    assert {m.config for m in METHODS.values()} <= names
    assert {"lora.yaml", "dora.yaml", "qlora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, capsys):
    data = yaml.safe_load(path.read_text())
    assert data.get("method") in METHODS, f"{path.name}: top-level 'method' must name a method"
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    # every key the file sets comes back, resolved, in the printed config
    for section in ("model", "data"):
        for key, value in (data.get(section) or {}).items():
            assert printed[section][key] == value, (path.name, section, key)
