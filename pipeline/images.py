"""Reading and decoding images: EXIF orientation applied, RGB out, decompression bombs refused.

Errors are `ImageError` with a message that names the input, so a stage can turn them into a
row with status `image_error` instead of dropping the query.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

# A 100-megapixel ceiling: far above any grounding input (the models resize to ~1 MP), far below
# what a crafted PNG can claim. PIL's own guard is process-global; this one is explicit per call.
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    pass


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels} (decompression-bomb guard)")
            if w < 1 or h < 1:
                raise ImageError(f"{name}: image has no pixels ({w}x{h})")
            probe.load()
            img = ImageOps.exif_transpose(probe)  # boxes come back in the displayed orientation
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite on white: a transparent background is meant to be seen as empty.
                rgba = img.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, rgba)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")  # 16-bit to 8-bit, keeping contrast
            return img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: exceeds the pixel limit (decompression-bomb guard): {e}") from None
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a decodable image ({type(e).__name__}: {e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None


def read_image(uri: str, storage_options: dict | None = None, max_pixels: int = MAX_PIXELS,
               retries: int | None = None, backoff: float | None = None) -> Image.Image:
    """Read a local path or any fsspec URL (s3://, gs://, https://, ...) and decode it. The read is
    retried on transient storage faults (`pipeline.storage.retry_io`, its defaults when None)."""
    import fsspec

    from .storage import DEFAULT_BACKOFF_S, DEFAULT_RETRIES, retry_io

    def read() -> bytes:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()

    try:
        data = retry_io(read, f"read {uri}", DEFAULT_RETRIES if retries is None else retries,
                        DEFAULT_BACKOFF_S if backoff is None else backoff)
    except FileNotFoundError:
        raise ImageError(f"{uri}: file not found") from None
    except OSError as e:
        raise ImageError(f"{uri}: cannot read ({type(e).__name__}: {e})") from None
    return decode_image(data, uri, max_pixels)
