"""Images of a data row: where they come from, and loading them with errors that name the row.

A row's images are in its `images` column (a list) or its `image` column (one image or a list).
Each image may be:

| form                         | example                                          |
|------------------------------|--------------------------------------------------|
| a local path                 | `"imgs/cat.png"` (relative to the data file's folder) or an absolute path |
| a data URI                   | `"data:image/png;base64,iVBORw0..."`             |
| a bare base64 string         | `"iVBORw0KGgo..."` (PNG/JPEG/... bytes, base64-encoded) |
| a `datasets` Image feature   | `{"bytes": b"...", "path": "..."}` (what Parquet and `datasets` hold), or a PIL image |

A missing file, undecodable bytes or an unsupported value raise `DataError` naming the data file,
the row, the field and the image's index (`images[1]`). Images are converted to RGB.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pmetal.data.formats import row_error

IMAGE_COLUMNS = ("images", "image")
IMAGE_FORMS = ("a path relative to the data file, a data URI (data:image/png;base64,...), a base64 string, "
               "or a datasets Image feature ({'bytes', 'path'})")


def image_column(row: dict) -> str | None:
    """The row's image column (`images` first, then `image`), or None when it has none."""
    return next((c for c in IMAGE_COLUMNS if row.get(c) is not None), None)


def image_refs(rows: Sequence[dict], index: int) -> tuple[str | None, list[Any]]:
    """(column, the row's image values as a list); (None, []) for a row without images."""
    column = image_column(rows[index])
    if column is None:
        return None, []
    value = rows[index][column]
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return column, values


def base_dir(path: str | Path | None) -> Path | None:
    """The folder relative image paths are resolved against: the data file's (or the data folder)."""
    if path is None:
        return None
    p = Path(path)
    return p if p.is_dir() else p.parent


def load_image(value: Any, *, root: Path | None, rows: Sequence[dict], index: int, field: str,
               path: str | None = None):
    """One image value of row `index` as an RGB `PIL.Image` (see the module docstring for the forms)."""
    from PIL import Image, UnidentifiedImageError

    def fail(message: str):
        return row_error(rows, index, message, field=field, expected=IMAGE_FORMS, path=path)

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data: bytes | None = None
    source = None
    origin = "the image"
    if isinstance(value, dict):  # the datasets Image feature
        if value.get("bytes"):
            data = value["bytes"]
            if isinstance(data, str):
                data = _decode_base64(data)
                if data is None:
                    raise fail("the 'bytes' of this image are a string that is not base64")
        elif value.get("path"):
            source = str(value["path"])
        else:
            raise fail("an image dict without 'bytes' or 'path'")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        if value.startswith("data:"):
            header, _, payload = value.partition(",")
            if ";base64" not in header:
                raise fail("a data URI that is not base64-encoded")
            data = _decode_base64(payload)
            if data is None:
                raise fail("a data URI whose payload is not valid base64")
        else:
            source = value
    else:
        raise fail(f"an image given as {type(value).__name__}")
    if source is not None:
        file = Path(source).expanduser()
        if not file.is_absolute() and root is not None:
            file = root / file
        if not file.is_file():
            data = _decode_base64(source) if len(source) > 64 and "/" not in source[:8] else None
            if data is None:
                raise fail(f"image file not found: {file}")
        else:
            origin = f"the image file {file}"
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise fail(f"cannot read the image file {file}: {exc}") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise fail(f"{origin} is corrupt or not an image ({exc})") from None
    return image.convert("RGB")


def _decode_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def load_row_images(rows: Sequence[dict], index: int, *, path: str | None = None,
                    root: Path | None = None) -> list:
    """Every image of row `index`, loaded (an empty list for a row without images)."""
    column, values = image_refs(rows, index)
    if root is None:
        root = base_dir(path)
    many = column is not None and isinstance(rows[index][column], (list, tuple))
    return [load_image(v, root=root, rows=rows, index=index, field=f"{column}[{k}]" if many else column, path=path)
            for k, v in enumerate(values)]
