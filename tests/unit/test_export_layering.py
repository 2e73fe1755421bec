"""pmetal.export is core: importing all of it pulls in no application layer, method or callback."""

import subprocess
import sys


def test_export_package_imports_no_cli_modules_or_callbacks():
    code = ("import sys, pmetal.export.api, pmetal.export.ane, pmetal.export.coreml, pmetal.export.gguf, "
            "pmetal.export.source, pmetal.export.pretokenizer, pmetal.export.modelfile, pmetal.export.agreement; "
            "print(sorted(m for m in sys.modules if m.startswith(('pmetal.cli', "
            "'pmetal.modules', 'pmetal.callbacks'))))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
