"""Pictures as PNG bytes, whatever form the caller has them in."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def png_bytes(image: Any) -> bytes:
    """A PNG file path, PNG bytes, a matplotlib figure, a PIL image or an (H, W[, C]) array, as PNG bytes."""
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buf = io.BytesIO()
    if hasattr(image, "savefig"):  # matplotlib Figure
        image.savefig(buf, format="png")
        return buf.getvalue()
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8:  # floats in [0, 1]
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    image.save(buf, format="PNG")
    return buf.getvalue()
