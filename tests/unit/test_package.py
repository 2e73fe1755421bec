"""The package layout: modules/ and callbacks/ install as pmetal.modules and pmetal.callbacks."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_modules_and_callbacks_resolve_to_repo_folders():
    import pmetal.callbacks
    import pmetal.modules
    from pmetal.modules import SftModule

    assert Path(pmetal.modules.__file__).resolve().parent == ROOT / "modules"
    assert Path(pmetal.callbacks.__file__).resolve().parent == ROOT / "callbacks"
    assert Path(sys.modules[SftModule.__module__].__file__).resolve() == ROOT / "modules" / "sft.py"


def test_example_dataset_is_package_data():
    from importlib import resources

    assert resources.files("pmetal.examples").joinpath("data/sft.jsonl").is_file()


def test_cli_help_is_fast_and_lists_commands():
    """`pmetal --help` must not import Lightning, PEFT or bitsandbytes (seconds each)."""
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "pmetal", "--help"], capture_output=True, text=True, check=True)
    elapsed = time.time() - start
    for command in ("train", "fit", "dataset"):
        assert command in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pmetal.cli; pmetal.cli.build_parser(); "
         "print(sorted(m for m in ('lightning', 'peft', 'bitsandbytes', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]", probe.stdout
    assert elapsed < 15, elapsed
