import io

import pytest
from PIL import Image

from workbench.errors import ImageError
from workbench.images import load_image


def _png(size=(8, 8), mode="RGB", color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_loads_path_bytes_and_pil(tmp_path):
    p = tmp_path / "ok.png"
    p.write_bytes(_png())
    for source in (p, str(p), _png(), Image.new("RGB", (4, 4))):
        assert load_image(source).mode == "RGB"


def test_transparency_is_composited_on_white():
    img = load_image(_png(mode="RGBA", color=(0, 0, 0, 0)))
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_zero_byte_file_is_named(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty \(0 bytes\).*empty.png"):
        load_image(p)


def test_non_image_file_is_named(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is text, not a picture")
    with pytest.raises(ImageError, match=r"Not an image.*notes.png"):
        load_image(p)


def test_truncated_image_is_named(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"corrupt or truncated.*cut.jpg"):
        load_image(p)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match="not found.*ghost.png"):
        load_image(tmp_path / "ghost.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(p)  # 144 Mpx that compresses to a few kB
    assert p.stat().st_size < 100_000
    with pytest.raises(ImageError, match=r"12000×12000.*limit is 40,000,000 pixels"):
        load_image(p)


def test_pixel_and_byte_limits_are_configurable():
    with pytest.raises(ImageError, match="limit is 10 pixels"):
        load_image(_png((4, 4)), max_pixels=10)
    with pytest.raises(ImageError, match="limit"):
        load_image(_png((4, 4)), max_bytes=10)
