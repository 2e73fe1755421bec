"""Shared fixtures: tiny random models built in place, with SmolLM2's real tokenizer and template."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.tiny import make_tiny_bert, make_tiny_causal_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # pmetal's Triton kernel (pmetal.generation.decode_attention) runs in Triton's interpreter on a
    # CPU-only machine; the switch is read when triton is first imported, so it is set here.
    os.environ.setdefault("TRITON_INTERPRET", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _share_the_cores_between_xdist_workers() -> None:
    """Under pytest-xdist (`-n 2`), each worker gets its share of the cores: N workers each running torch
    on every core would oversubscribe the CPU and slow every step. Subprocesses inherit it through
    OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


_share_the_cores_between_xdist_workers()


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup`, a unit-test file runs whole on one worker (its module-scoped fixtures,
    such as test_serve's servers or test_distributed's two-process launch, are built once and its tests
    never race each other); the long learning tests are spread one by one."""
    for item in items:
        if "learning" not in item.path.parts:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny random Llama (2 layers, hidden 32) and SmolLM2's tokenizer."""
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct (converted from the shipped GGUF once, then cached)."""
    from pmetal.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory):
    """{family: directory} of tiny random VLMs (Idefics3/SmolVLM shape, Qwen2-VL, Qwen2.5-VL, Qwen3-VL),
    see tests/tiny_vlm.py."""
    from tests.tiny_vlm import ALL_FAMILIES, make_tiny_vlm

    return {family: make_tiny_vlm(family, tmp_path_factory.mktemp(f"tiny-{family}")) for family in ALL_FAMILIES}


@pytest.fixture(scope="session")
def colour_images(tmp_path_factory):
    """A folder with red.png, green.png and blue.png (32x32 squares on grey)."""
    from tests.tiny_vlm import write_colour_images

    return write_colour_images(tmp_path_factory.mktemp("colours"))
