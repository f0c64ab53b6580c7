"""Image preprocessing without torch: bytes -> uint8 [3, H, W], as open_clip's eval transform prepares images.

Decode with PIL under limits (bytes, pixels: decompression bombs; truncated or corrupt files are errors), apply
the EXIF orientation, convert to RGB, then resize and center-crop by the manifest's rule exactly as open_clip
does (torchvision ``Resize`` + ``CenterCrop`` on PIL images for ``shortest``; its ``ResizeKeepRatio`` +
``CenterCropOrPad`` for ``longest``; a plain resize for ``squash``). Normalisation happens in the ONNX graph.

RGB conversion: transparent pixels are composited onto white (open_clip's ``convert("RGB")`` would keep whatever
colour hides under them, often black); 16-bit grayscale is scaled to 8 bits (PIL would clip it to white);
CMYK, palette and grayscale images use PIL's conversion.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from hqclip.repo.manifest import ImageSpec

BACKGROUND = (255, 255, 255)
_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(ValueError):
    """The bytes are not an image we can use; the message says why (the caller names the field)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image`` whatever its mode (see the module docstring)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT:
        eight_bit = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop_or_pad(pixels: np.ndarray, height: int, width: int, fill: int) -> np.ndarray:
    """torchvision's center_crop / open_clip's center_crop_or_pad on an [H, W, 3] array."""
    h, w = pixels.shape[:2]
    if height > h or width > w:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)),
                        constant_values=fill)
        h, w = pixels.shape[:2]
    top, left = round((h - height) / 2.0), round((w - width) / 2.0)
    return pixels[top : top + height, left : left + width]


class ImagePreprocessor:
    """``preprocessor(data: bytes) -> uint8 [3, H, W]``; raises ``ImageError`` for bytes it cannot use."""

    def __init__(self, spec: ImageSpec, max_bytes: int, max_pixels: int) -> None:
        self.spec = spec
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def __call__(self, data: bytes) -> np.ndarray:
        return self.transform(self.decode(data))

    def decode(self, data: bytes) -> Image.Image:
        """An upright RGB image, or ImageError."""
        if not data:
            raise ImageError("the image is empty (0 bytes)")
        if len(data) > self.max_bytes:
            raise ImageError(f"the image has {len(data)} bytes, more than the limit of {self.max_bytes}")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"the image is too large to decode safely ({exc})") from None
        except Exception:  # UnidentifiedImageError, or whatever a malformed header makes a plugin raise
            raise ImageError("the bytes are not an image PIL can read (send JPEG, PNG, WebP, GIF, BMP or TIFF)") \
                from None
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageError(f"the image is {width}x{height} = {width * height} pixels, more than the limit of "
                             f"{self.max_pixels}")
        if width == 0 or height == 0:
            raise ImageError(f"the image is {width}x{height}: it has no pixels")
        try:
            image.load()
        except Exception as exc:  # OSError "image file is truncated", decoder errors
            raise ImageError(f"the image is truncated or corrupt ({exc})") from None
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block: keep the stored orientation rather than refuse the image
            pass
        return to_rgb(image)

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """PIL resize to (height, width), skipped when the size already matches (as torchvision does)."""
        height, width = size
        if image.size == (width, height):
            return image
        return image.resize((width, height), _INTERPOLATION[self.spec.interpolation])

    def transform(self, image: Image.Image) -> np.ndarray:
        """Resize and crop an RGB image by the manifest's rule; uint8 [3, H, W]."""
        height, width = self.spec.size
        w, h = image.size
        mode = self.spec.resize_mode
        if mode == "squash":
            image = self._resize(image, (height, width))
        elif mode == "shortest" and height == width:
            # torchvision Resize(int): the short side becomes `height`, the long side is scaled and floored
            short, long = min(w, h), max(w, h)
            new_long = int(height * long / short)
            image = self._resize(image, (height, new_long) if w >= h else (new_long, height))
        else:
            # open_clip's ResizeKeepRatio: scale so the shortest (or longest) side fits, rounding each side
            ratios = (h / height, w / width)
            ratio = max(ratios) if mode == "longest" else min(ratios)
            image = self._resize(image, (round(h / ratio), round(w / ratio)))
        fill = self.spec.fill_color if mode == "longest" else 0
        pixels = _center_crop_or_pad(np.asarray(image, dtype=np.uint8), height, width, fill)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))
