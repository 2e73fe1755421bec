"""The served models: one base in memory, LoRA adapters over it selected by the request's `model`.

The adapters are PEFT's multi-adapter model (`load_adapter` each under its own name, `set_adapter`
to pick one, `disable_adapter()` for the bare base), so N adapters cost their LoRA weights only.
A `--model` that is itself an adapter or a pmetal run is served with its adapter on, under the
name given; `--adapter NAME=PATH` adds the others.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pmetal.errors import PmetalError


def parse_adapter_flag(value: str) -> tuple[str, str]:
    """`NAME=PATH` -> (name, path), with a one-line error for anything else."""
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise PmetalError(f"--adapter {value!r}: expected NAME=PATH (e.g. --adapter support=runs/sft-support)")
    return name.strip(), path.strip()


def adapter_dir(path: str) -> Path:
    """The adapter directory of a run or adapter path (a run's `final/`)."""
    from pmetal.export.source import resolve_source

    resolved = Path(str(resolve_source(path)))
    if not (resolved / "adapter_config.json").is_file():
        raise PmetalError(f"--adapter {path}: no adapter_config.json; expected a PEFT adapter or a pmetal run directory")
    return resolved


def adapter_base(adapter: Path) -> str:
    """The base an adapter was trained on: pmetal's record, else PEFT's, else the default model."""
    from pmetal.export.source import adapter_settings

    return (adapter_settings(adapter).get("model")
            or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or "default")


class ServedModels:
    """Model ids -> the PEFT adapter each one runs (None: the bare base)."""

    def __init__(self, model, tokenizer, adapters: dict[str, str | None]) -> None:
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.ids = list(adapters)

    @contextlib.contextmanager
    def activate(self, model_id: str):
        adapter = self.adapters[model_id]
        if adapter is None and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
            return
        if adapter is not None:
            self.model.set_adapter(adapter)
        yield


def load_served(model_name: str, adapters: list[tuple[str, str]], *, device, dtype=None,
                trust_remote_code: bool = False) -> ServedModels:
    """Load `model_name` (a model, adapter or run) and each `(name, path)` adapter over one base.

    Adapter names are served as given; inside PEFT they are `adapter0`, `adapter1`, ... (PEFT
    names become module keys, which cannot hold the dots and slashes of a path-like name).
    """
    from transformers import AutoTokenizer

    from pmetal.export.source import resolve_source
    from pmetal.models import ensure_pad_token, load_model_and_tokenizer

    source = Path(str(resolve_source(model_name)))
    main_adapter = source if (source / "adapter_config.json").is_file() else None
    base = adapter_base(main_adapter) if main_adapter else str(resolve_source(model_name))
    model, tokenizer = load_model_and_tokenizer(base, dtype=dtype, trust_remote_code=trust_remote_code)
    served: dict[str, str | None] = {}
    paths = ([(model_name, main_adapter)] if main_adapter else []) + [(n, adapter_dir(p)) for n, p in adapters]
    if not main_adapter:
        served[model_name] = None
    for i, (name, path) in enumerate(paths):
        if name in served:
            raise PmetalError(f"--adapter {name}={path}: the name {name!r} is served already; give each one its own")
        internal = f"adapter{i}"
        try:
            if i == 0:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(path), adapter_name=internal)
            else:
                model.load_adapter(str(path), adapter_name=internal)
        except Exception as e:  # noqa: BLE001 - a shape mismatch means another base: say which adapter
            raise PmetalError(f"adapter {path}: could not be loaded onto {base}: {str(e).splitlines()[0]}") from None
        served[name] = internal
    if main_adapter and (main_adapter / "tokenizer_config.json").is_file():  # its pad token and template
        tokenizer = AutoTokenizer.from_pretrained(str(main_adapter), trust_remote_code=trust_remote_code)
        ensure_pad_token(tokenizer)
    return ServedModels(model.to(device).eval(), tokenizer, served)
