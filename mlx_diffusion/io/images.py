"""Image files with their metadata, written atomically (a temporary sibling, then a rename), so that a half-written
image never stands under the final name, and read back whatever the format.

The format follows the file's suffix. PNG keeps the metadata (a flat {name: text} dict) in international text
chunks. JPEG and WebP have no text chunks: there the same dict travels as JSON (pure ASCII) in the EXIF UserComment
and in an XMP packet, with the prompt as EXIF ImageDescription / XMP dc:description for image viewers. A JSON file
is a sidecar: its object is the metadata. Nothing here interprets the metadata; `pipelines.settings` does.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import tempfile
from pathlib import Path

from ..errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
LOSSY = ("JPEG", "WEBP")  # the formats --quality applies to
DEFAULT_QUALITY = 95
MAX_METADATA_BYTES = 1 << 20  # a sidecar or metadata packet larger than this is not ours

_EXIF_IFD, _USER_COMMENT, _IMAGE_DESCRIPTION, _SOFTWARE = 0x8769, 0x9286, 0x010E, 0x0131
_ASCII = b"ASCII\0\0\0"  # EXIF UserComment's character-code prefix
_XMP_NS = "https://github.com/mlx-diffusion/mlx_diffusion/ns/1.0/"


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


def format_of(path) -> str:
    """PIL's format name for a file name's suffix; InputError for a suffix we do not write."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: the file name must end in .png, .jpg, .jpeg or .webp")
    return fmt


def write_atomic(path, write):
    """Call write(file) on a temporary sibling of `path`, then rename it into place, with the umask's permissions
    (mkstemp makes 0600; an image is an ordinary file). Any failure or interruption leaves nothing behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _xmp(text: dict[str, str]) -> bytes:
    body = html.escape(json.dumps(text, ensure_ascii=True), quote=False)
    prompt = html.escape(text.get("prompt", ""), quote=False)
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:mlxd="{_XMP_NS}">'
            f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{prompt}</rdf:li></rdf:Alt></dc:description>'
            f'<mlxd:metadata>{body}</mlxd:metadata>'
            '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


def write_image(image, path, text: dict[str, str], quality: int | None = None):
    """A PIL image at `path` in the format of its suffix, carrying `text` (see the module's docstring).

    quality: JPEG/WebP quality 1-100 [95]; InputError for PNG (lossless) or out of range, before anything is written.
    """
    fmt = format_of(path)
    if quality is not None and fmt not in LOSSY:
        raise InputError(f"{path}: quality is for JPEG and WebP files (PNG is lossless)")
    if quality is not None and (not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100):
        raise InputError(f"quality must be an integer from 1 to 100, got {quality!r}")
    options = {}
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        meta = PngInfo()
        for k, v in text.items():
            meta.add_itxt(k, v)
        options["pnginfo"] = meta
    else:
        from PIL import Image

        from .. import __version__

        exif = Image.Exif()
        exif[_SOFTWARE] = f"mlx_diffusion {__version__}"
        if text.get("prompt"):
            exif[_IMAGE_DESCRIPTION] = text["prompt"]  # viewers show it; non-ASCII becomes "?", the JSON keeps it
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII + json.dumps(text, ensure_ascii=True).encode("ascii")
        exif = exif.tobytes()
        if len(exif) > 65000:  # a JPEG APP1 segment holds 64 KiB
            raise InputError(f"{path}: the settings ({len(exif)} bytes, a very long prompt) do not fit in "
                             "JPEG/WebP metadata; write a PNG")
        options.update(exif=exif, xmp=_xmp(text), quality=DEFAULT_QUALITY if quality is None else quality)
    write_atomic(path, lambda f: image.save(f, format=fmt, **options))


def write_json(path, data: dict):
    """A JSON file (a metadata sidecar), atomically."""
    body = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomic(path, lambda f: f.write(body))


def _json_object(raw, where: str) -> dict:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where} is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where} is not a JSON object")
    return data


def _must_be_file(path: Path):
    if not path.is_file():
        raise InputError(f"{path} " + ("is not a file" if path.exists() else "does not exist"))


MAX_PIXELS = 1 << 26  # a start image larger than 8192 x 8192 is refused before it is decoded
MAX_IMAGE_BYTES = 1 << 30


def _open(path: Path):
    """PIL's lazy image on the file's bytes in memory. Not on the file: PIL reads a chunk with `fp.read(length)`
    for the length the file claims, and a file object allocates that much before reading (a 147-byte PNG whose
    IDAT claims 285 MB allocated 285 MB); from memory a read returns only the bytes there are."""
    from PIL import Image

    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InputError(f"{path} is over {MAX_IMAGE_BYTES >> 30} GB: not an image we read")
    return Image.open(io.BytesIO(path.read_bytes()))


def read_image(path):
    """An image file as an RGB PIL image, decoded; InputError for a missing, unreadable or absurdly large one."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _must_be_file(path)
    try:
        with _open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise InputError(f"{path} is {im.size[0]}x{im.size[1]}: too large for a start image")
            return im.convert("RGB")
    except InputError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path} is not a readable image ({e.__class__.__name__})") from None


def read_metadata(path) -> dict:
    """The metadata a file carries: a PNG's text chunks, a JPEG's or WebP's EXIF UserComment (else its XMP packet)
    as a dict, or a JSON sidecar's object. InputError for an unreadable file or one that carries none of ours."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _must_be_file(path)
    if path.suffix.lower() == ".json":
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise InputError(f"{path} is too large for a metadata file")
        return _json_object(path.read_bytes(), str(path))
    try:
        with _open(path) as im:
            if im.format == "PNG":  # the text chunks before the pixels (where we write ours): nothing is decoded
                return {k: v for k, v in im.info.items() if isinstance(v, str)}
            if im.format not in LOSSY:
                raise InputError(f"{path} is a {im.format} image; ours are PNG, JPEG or WebP")
            comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            xmp = im.info.get("xmp")
    except InputError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise InputError(f"{path} is not a readable image ({e.__class__.__name__})") from None
    if isinstance(comment, bytes) and comment.startswith(_ASCII) and len(comment) < MAX_METADATA_BYTES:
        return _json_object(comment[len(_ASCII):], f"{path}'s EXIF UserComment")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    if isinstance(xmp, bytes) and len(xmp) < MAX_METADATA_BYTES:
        found = re.search(rb"<mlxd:metadata>(.*?)</mlxd:metadata>", xmp, re.S)
        if found:
            return _json_object(html.unescape(found.group(1).decode("utf-8", "replace")), f"{path}'s XMP")
    raise InputError(f"{path} carries no mlx_diffusion metadata")
