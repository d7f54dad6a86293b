"""Decoding image files by content: any format Pillow reads, any mode, to RGB uint8 of one size.

A file that cannot be decoded is not an error of the run: it is skipped, with the reason, so the
caller can report it. An image over the pixel limit is refused before it is decoded (a possible
decompression bomb).

Example:
    >>> import tempfile
    >>> path = f"{tempfile.mkdtemp()}/photo.png"
    >>> Image.new("L", (80, 60), 128).save(path)
    >>> pixels, reason = decode(path, size=64)
    >>> pixels.shape, reason
    ((64, 64, 3), None)
    >>> decode(__file__, size=64)[0] is None  # not an image: skipped, with its reason
    True
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold


class BadImage(ValueError):
    """A file that is not a usable image; the message is the short reason."""


def open_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB; raises BadImage with a short reason when it cannot."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImage(f"{width}x{height} pixels is over the limit of {max_pixels} "
                                     "(refused as a possible decompression bomb)")
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))  # decode at reduced scale: much faster
                img.load()
                if img.mode == "P":
                    img = img.convert("RGBA")  # palette transparency is only honoured through RGBA
                return img if img.mode == "RGB" else img.convert("RGB")  # loaded: usable once the file is closed
        except BadImage:
            raise
        except UnidentifiedImageError:
            raise BadImage("not an image (no decoder recognises its content)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage("over the pixel limit (refused as a possible decompression bomb)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"damaged image: {exc}") from None


def pixels_of(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The one way a file becomes training or prediction input: size x size x 3 uint8 RGB. JPEGs are decoded at
    reduced scale first (Pillow's draft), then every image is resized bilinearly. Raises BadImage or OSError."""
    img = open_rgb(path, max_pixels, draft_size=size)
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def decode(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """(size x size x 3 uint8 pixels, None), or (None, why it was skipped)."""
    try:
        return pixels_of(path, size, max_pixels), None
    except BadImage as exc:
        return None, str(exc)
    except OSError as exc:  # stat or open failed: permissions, a vanished file
        return None, f"unreadable: {exc.strerror or exc}"


def load_for_prediction(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image the user named, decoded exactly as training decodes (:func:`pixels_of`); refused with one clear
    line if it is not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        return pixels_of(path, size, max_pixels)
    except (BadImage, OSError) as exc:
        raise UserError(f"cannot use {path}: {exc}") from None
