"""Real photos (scikit-image's bundled ones) as encoded bytes, and the odd formats clients send."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo(name: str = "astronaut") -> Image.Image:
    array = getattr(skdata, name)()
    return Image.fromarray(array[..., :3] if array.ndim == 3 else array)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{b64(data)}"


def jpeg(name: str = "astronaut") -> bytes:
    return encode(photo(name), "JPEG", quality=95)


def write_jpegs(folder: Path, names) -> dict[str, Path]:
    """``folder/<name>.jpg`` for each photo name, as a user's folder of photos; name -> path."""
    files = {name: Path(folder) / f"{name}.jpg" for name in names}
    for name, path in files.items():
        path.write_bytes(jpeg(name))
    return files


def exif_rotated_jpeg(name: str = "astronaut") -> tuple[bytes, Image.Image]:
    """A JPEG stored rotated with EXIF Orientation=6 (display: rotate 90° clockwise), and the upright image."""
    upright = photo(name)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), upright


def odd_images() -> dict[str, bytes]:
    """Formats that must embed correctly: tiny, grayscale, alpha, palette, CMYK, 16-bit."""
    rgb = photo("coffee")
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "1x1": encode(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"),
        "grayscale": encode(rgb.convert("L"), "JPEG"),
        "rgba": encode(rgb.convert("RGBA"), "PNG"),
        "palette": encode(rgb.convert("P"), "PNG"),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "16bit": encode(Image.fromarray(gray16), "PNG"),
        "webp": encode(rgb, "WEBP"),
    }
