"""Image files with metadata: PNG text chunks, JPEG/WebP EXIF + XMP, JSON sidecars; written atomically, read back
from any of them, and every unreadable or foreign file a one-line InputError."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mlx_diffusion.errors import InputError
from mlx_diffusion.io.images import read_metadata, write_image, write_json

TEXT = {"prompt": "un renard « roux » 雪の中の狐 🦊 <b>&amp;</b>", "seed": "7",
        "mlx_diffusion.settings": json.dumps({"prompt": "un renard « roux » 雪の中の狐 🦊 <b>&amp;</b>", "seed": 7})}


def _image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.JPEG", "a.webp"])
def test_metadata_round_trips_through_every_format(tmp_path, name):
    write_image(_image(), tmp_path / name, TEXT)
    assert read_metadata(tmp_path / name) == TEXT
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left
    with Image.open(tmp_path / name) as im:
        assert im.size == (40, 24) and im.format == {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG",
                                                     "webp": "WEBP"}[name.split(".")[1].lower()]
        if im.format != "PNG":  # what other tools read: EXIF ImageDescription and an XMP packet
            assert im.getexif()[0x010E].startswith("un renard")
            assert b"dc:description" in im.info["xmp"] and "雪の中の狐".encode() in im.info["xmp"]


def test_xmp_alone_is_enough(tmp_path):
    write_image(_image(), tmp_path / "a.webp", TEXT)
    with Image.open(tmp_path / "a.webp") as im:  # a tool that keeps XMP but drops EXIF
        im.save(tmp_path / "b.webp", xmp=im.info["xmp"])
    assert read_metadata(tmp_path / "b.webp") == TEXT


def test_quality_changes_lossy_files_and_is_checked(tmp_path):
    sizes = {}
    for q in (20, 95):
        write_image(_image(), tmp_path / f"q{q}.jpg", TEXT, quality=q)
        sizes[q] = (tmp_path / f"q{q}.jpg").stat().st_size
    assert sizes[20] < sizes[95]
    for name, quality, match in (("a.png", 90, "quality is for JPEG and WebP"), ("a.jpg", 0, "from 1 to 100"),
                                 ("a.webp", 101, "from 1 to 100"), ("a.gif", None, "must end in .png, .jpg")):
        with pytest.raises(InputError, match=match):
            write_image(_image(), tmp_path / name, TEXT, quality=quality)
        assert not (tmp_path / name).exists()


def test_a_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, f, **kw):
            f.write(b"half an image")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_image(Broken(), tmp_path / "a.jpg", TEXT)
    assert list(tmp_path.iterdir()) == []


def test_too_long_for_exif_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="do not fit in JPEG/WebP metadata; write a PNG"):
        write_image(_image(), tmp_path / "a.jpg", {"prompt": "x" * 40000, "all": "y" * 40000})
    assert list(tmp_path.iterdir()) == []


def test_sidecar_json(tmp_path):
    write_json(tmp_path / "a.json", {"settings": {"prompt": "é"}})
    assert read_metadata(tmp_path / "a.json") == {"settings": {"prompt": "é"}}
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("make, match", [
    (lambda p: p.with_suffix(".json").write_text("[1, 2]"), "is not a JSON object"),
    (lambda p: p.with_suffix(".json").write_text("{broken"), "is not valid JSON"),
    (lambda p: p.with_suffix(".json").write_bytes(b"{" + b" " * (1 << 20) + b"}"), "too large"),
    (lambda p: p.with_suffix(".png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "not a readable image"),
    (lambda p: p.with_suffix(".jpg").write_bytes(b"hello"), "not a readable image"),
    (lambda p: _image().save(p.with_suffix(".bmp")), "is a BMP image"),
    (lambda p: _image().save(p.with_suffix(".jpg")), "carries no mlx_diffusion metadata"),
    (lambda p: _image().save(p.with_suffix(".webp"), xmp=b"<x:xmpmeta>other</x:xmpmeta>"), "carries no mlx_diffusion"),
    (lambda p: _image().save(p.with_suffix(".jpg"), exif=_exif_comment(b"ASCII\0\0\0[1]")), "is not a JSON object"),
    (lambda p: p.with_suffix(".png").mkdir(), "is not a file"),
    (lambda p: None, "does not exist"),
])
def test_unreadable_metadata_is_one_line(tmp_path, make, match):
    make(tmp_path / "f")
    path = next(iter(tmp_path.iterdir()), tmp_path / "f.png")
    with pytest.raises(InputError, match=match) as e:
        read_metadata(path)
    assert "\n" not in str(e.value)


def _exif_comment(comment: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    return exif.tobytes()
