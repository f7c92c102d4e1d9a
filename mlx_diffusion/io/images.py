"""Image files with their settings: PNG text chunks written atomically (a temporary sibling, then a rename), so a
half-written image never stands under the final name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import InputError


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def write_png(image, path, text: dict[str, str]):
    """A PIL image as PNG at `path`, with `text` as international text chunks."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    meta = PngInfo()
    for k, v in text.items():
        meta.add_itxt(k, v)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an image is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_png_text(path) -> dict[str, str]:
    """A PNG's text chunks; InputError for a file that is not a readable PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise InputError(f"{path} is a {im.format} image, not a PNG")
            return dict(im.text)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path} is not a readable image ({e.__class__.__name__})") from None
