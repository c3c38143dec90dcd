"""Images inlined as data: URIs, so that a report stays one file that opens anywhere, offline."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
              ".webp": "image/webp", ".svg": "image/svg+xml"}


def data_uri(image: bytes | str | Path | Image.Image, mime: str = "image/png") -> str:
    """A data: URI for PNG bytes (or bytes of type `mime`), an image file, a PIL image or a
    matplotlib figure (anything with `savefig`, so matplotlib is not imported here)."""
    if isinstance(image, (bytes, bytearray)):
        return _encode(bytes(image), mime)
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.suffix.lower() not in MIME_TYPES:
            raise ValueError(f"{path}: cannot inline a {path.suffix or 'suffix-less'} file as an image")
        return _encode(path.read_bytes(), MIME_TYPES[path.suffix.lower()])
    buffer = io.BytesIO()
    if isinstance(image, Image.Image):
        image.save(buffer, format="PNG")
    elif hasattr(image, "savefig"):
        image.savefig(buffer, format="png", bbox_inches="tight")
    else:
        raise TypeError(f"cannot inline a {type(image).__name__} as an image")
    return _encode(buffer.getvalue(), "image/png")


def _encode(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
