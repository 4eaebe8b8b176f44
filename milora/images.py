"""Images in records: placeholders, checks and loading, shared by training and evaluation data.

Pillow is imported inside the functions, so text-only use never loads it.
"""

from __future__ import annotations

from pathlib import Path

from milora.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
SUPPORTED_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
"""PIL image modes converted to RGB without loss of meaning; others (16-bit, float, HSV, LAB) are refused."""


def split_placeholders(text: str) -> list[dict[str, str]]:
    """'<image>\\nWhat is it?' -> [image, text '\\nWhat is it?'] (empty texts dropped)."""
    content = []
    for position, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if position:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return content


def _too_large(path: Path, index: int, error: Exception) -> DataError:
    """PIL's decompression-bomb refusal (more than 2 x ``Image.MAX_IMAGE_PIXELS`` pixels) as a `DataError`."""
    from PIL import Image

    return DataError(f"record {index}: image {path} is too large to decode safely ({error}); PIL's limit is "
                     f"{2 * Image.MAX_IMAGE_PIXELS} pixels: resize the image.")


def check_image(path: Path, index: int) -> None:
    """A `DataError` naming the file and the record unless ``path`` is a readable image of a supported mode."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"record {index}: image {path} does not exist (check image_folder and the record's path).")
    try:
        with Image.open(path) as image:
            mode = image.mode
            image.verify()  # structure and checksums, without decoding every pixel
    except Image.DecompressionBombError as error:
        raise _too_large(path, index, error) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"record {index}: image {path} is unreadable or corrupt ({error}).") from error
    if mode not in SUPPORTED_MODES:
        raise DataError(f"record {index}: image {path} has mode {mode!r}, which milora does not convert to RGB: "
                        f"save it as RGB (supported modes: {', '.join(SUPPORTED_MODES)}).")


def load_image(path: Path, index: int):
    """The image at ``path`` as an RGB PIL image (a `DataError` naming the record if it cannot be decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise _too_large(path, index, error) from error
    except OSError as error:
        raise DataError(f"record {index}: image {path} cannot be decoded ({error}).") from error
