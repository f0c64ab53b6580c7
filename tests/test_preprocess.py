"""The services' image preprocessing gives open_clip's pixels, handles odd formats, and refuses bad bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from open_clip.transform import image_transform
from PIL import Image
from skimage import data as skdata

from hqclip.repo.manifest import ImageSpec
from hqclip.repo.preprocess import ImageError, ImagePreprocessor

LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 40_000_000}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def spec(size=(224, 224), resize_mode="shortest", interpolation="bicubic", fill_color=0) -> ImageSpec:
    return ImageSpec(model="m_image", input="pixel_values", output="embeddings", size=size, resize_mode=resize_mode,
                     interpolation=interpolation, fill_color=fill_color, mean=CLIP_MEAN, std=CLIP_STD)


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def open_clip_pixels(image: Image.Image, s: ImageSpec) -> np.ndarray:
    """open_clip's eval transform (mean 0, std 1: no normalisation) as uint8 [3, H, W]."""
    height, width = s.size
    transform = image_transform(height if height == width else (height, width), is_train=False, mean=(0, 0, 0),
                                std=(1, 1, 1), resize_mode=s.resize_mode, interpolation=s.interpolation,
                                fill_color=s.fill_color)
    return (transform(image).numpy() * 255).round().astype(np.uint8)


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "text"]
SPECS = {
    "shortest-square": spec(),
    "shortest-bilinear": spec((96, 96), interpolation="bilinear"),
    "shortest-portrait": spec((224, 160)),
    "longest-pad": spec(resize_mode="longest", fill_color=128),
    "squash": spec((200, 256), resize_mode="squash"),
}


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("rule", SPECS)
def test_pixels_equal_open_clip_transform(name, rule):
    image = photo(name).convert("RGB")
    for candidate in (image, image.transpose(Image.Transpose.ROTATE_90), image.resize((37, 11))):
        got = ImagePreprocessor(SPECS[rule], **LIMITS).transform(candidate)
        assert got.dtype == np.uint8 and got.shape == (3, *SPECS[rule].size)
        np.testing.assert_array_equal(got, open_clip_pixels(candidate, SPECS[rule]))


def test_jpeg_bytes_decode_to_the_same_pixels_as_pil():
    data = encode(photo("chelsea"), "JPEG", quality=90)
    preprocess = ImagePreprocessor(spec(), **LIMITS)
    np.testing.assert_array_equal(preprocess(data), open_clip_pixels(Image.open(io.BytesIO(data)), spec()))


def test_one_pixel_image():
    out = ImagePreprocessor(spec(), **LIMITS)(encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"))
    assert out.shape == (3, 224, 224)
    assert (out[:, 0, 0] == (200, 30, 40)).all() and (out == out[:, :1, :1]).all()


def test_grayscale_becomes_three_equal_channels():
    gray = photo("camera")
    out = ImagePreprocessor(spec(), **LIMITS)(encode(gray, "PNG"))
    assert (out[0] == out[1]).all() and (out[1] == out[2]).all()
    np.testing.assert_array_equal(out, open_clip_pixels(gray.convert("RGB"), spec()))


def test_sixteen_bit_png_is_scaled_not_clipped():
    gray8 = np.asarray(photo("camera"))
    png16 = encode(Image.fromarray(gray8.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    preprocess = ImagePreprocessor(spec(), **LIMITS)
    np.testing.assert_array_equal(preprocess(png16), preprocess(encode(Image.fromarray(gray8), "PNG")))


def test_opaque_rgba_equals_rgb_and_transparency_becomes_white():
    rgb = photo("coffee")
    preprocess = ImagePreprocessor(spec(), **LIMITS)
    np.testing.assert_array_equal(preprocess(encode(rgb.convert("RGBA"), "PNG")), preprocess(encode(rgb, "PNG")))

    rgba = np.asarray(rgb.convert("RGBA")).copy()
    rgba[..., :3] = 0  # black under ...
    rgba[:, : rgba.shape[1] // 2, 3] = 0  # ... a transparent left half, opaque right half
    out = ImagePreprocessor(spec(resize_mode="squash"), **LIMITS)(encode(Image.fromarray(rgba), "PNG"))
    assert (out[:, :, :100] == 255).all() and (out[:, :, 124:] == 0).all()


def test_logo_with_alpha_is_composited_on_white():
    logo = photo("logo")  # RGBA
    array = np.asarray(logo).astype(np.float64)
    alpha = array[..., 3:] / 255
    expected = Image.fromarray(np.rint(array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8))
    got = ImagePreprocessor(spec(), **LIMITS)(encode(logo, "PNG"))
    assert np.abs(got.astype(int) - open_clip_pixels(expected, spec()).astype(int)).max() <= 1


def test_palette_png_with_and_without_transparency():
    coffee = photo("coffee")
    palette = coffee.convert("P")
    preprocess = ImagePreprocessor(spec(), **LIMITS)
    np.testing.assert_array_equal(preprocess(encode(palette, "PNG")), open_clip_pixels(palette.convert("RGB"), spec()))

    indices = np.asarray(palette)
    clear = indices == indices[0, 0]
    decoded = np.asarray(preprocess.decode(encode(palette, "PNG", transparency=int(indices[0, 0]))))
    assert (decoded[clear] == 255).all()  # the transparent colour became white ...
    np.testing.assert_array_equal(decoded[~clear], np.asarray(palette.convert("RGB"))[~clear])  # ... nothing else


def test_la_image():
    gray = photo("camera")
    la = Image.merge("LA", (gray, Image.new("L", gray.size, 255)))
    np.testing.assert_array_equal(ImagePreprocessor(spec(), **LIMITS)(encode(la, "PNG")),
                                  open_clip_pixels(gray.convert("RGB"), spec()))


def test_cmyk_jpeg_keeps_its_colours():
    rgb = photo("astronaut")
    preprocess = ImagePreprocessor(spec(), **LIMITS)
    cmyk = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    difference = np.abs(preprocess(cmyk).astype(int) - preprocess(encode(rgb, "PNG")).astype(int))
    assert difference.mean() < 3  # JPEG noise only; an inverted or channel-swapped image is ~100 off


def test_exif_orientation_is_applied():
    upright = photo("astronaut")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    rotated = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    preprocess = ImagePreprocessor(spec(), **LIMITS)
    got = preprocess(rotated).astype(int)
    assert np.abs(got - preprocess(encode(upright, "JPEG", quality=95)).astype(int)).mean() < 2
    assert np.abs(got - preprocess(encode(stored, "JPEG", quality=95)).astype(int)).mean() > 20


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``: PIL reads the size without decoding anything."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (b"", LIMITS, "empty"),
        (b"this is plain text, not an image", LIMITS, "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 100, LIMITS, "not an image"),
        (encode(photo("astronaut"), "JPEG")[:5000], LIMITS, "truncated"),
        (encode(photo("astronaut"), "PNG")[:20000], LIMITS, "truncated"),
        (encode(photo("astronaut"), "JPEG"), {**LIMITS, "max_bytes": 1000}, "bytes"),
        (encode(Image.new("L", (3000, 3000)), "PNG"), {**LIMITS, "max_pixels": 4_000_000}, "pixels"),
        (png_header_only(20_000, 20_000), LIMITS, "pixels"),
        (png_header_only(20_000, 20_000), {**LIMITS, "max_pixels": 10**12}, "too large"),
    ],
    ids=["empty", "text", "jpeg-magic-only", "truncated-jpeg", "truncated-png", "too-many-bytes", "bomb",
         "bomb-header", "bomb-pil-limit"],
)
def test_bad_bytes_raise_image_error(data, limits, message):
    with pytest.raises(ImageError, match=message) as raised:
        ImagePreprocessor(spec(), **limits)(data)
    assert isinstance(raised.value, ValueError)
