"""A cheap check that a dataset's image files can be used, before any is decoded for training.

Decoding every photo of a dataset just to find the one that is broken costs as much as the
decoding the search does anyway; what breaks in practice is cheaper to find:

* an empty file, or one that is not an image (its header does not open);
* a truncated JPEG (a copy that stopped early): a whole JPEG ends with the end-of-image marker
  ``FF D9``, which cannot occur inside the compressed data, so a file that does not end with it is
  decoded to be sure (camera files with bytes after the marker decode fine and pass);
* a truncated or corrupt PNG: :meth:`PIL.Image.Image.verify` reads every chunk and checks its CRC
  without decompressing;
* other formats (BMP, TIFF, WebP: rare in IQA datasets) are decoded.

A JPEG whose compressed data is damaged but complete passes here and fails when it is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

__all__ = ["image_problem", "image_problems"]

_EOI = b"\xff\xd9"  # JPEG end-of-image marker


def image_problem(path: str) -> str | None:
    """Why the image file at ``path`` cannot be used, or ``None`` when it looks whole (module docstring)."""
    try:
        if os.path.getsize(path) == 0:
            return "the image file is empty (0 bytes)"
        with Image.open(path) as im:
            if im.format == "JPEG":
                with open(path, "rb") as fh:
                    fh.seek(-2, os.SEEK_END)
                    if fh.read(2) != _EOI:
                        im.load()  # no end marker: a truncated copy fails to decode here
            elif im.format == "PNG":
                im.verify()
            else:
                im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"the image cannot be read ({type(exc).__name__}: {exc})"
    return None


def image_problems(paths: Sequence[str], threads: int | None = None) -> dict[int, str]:
    """:func:`image_problem` of every path, on a thread pool: index in ``paths`` -> its problem (only
    the files that have one)."""
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = pool.map(image_problem, paths)
        return {i: problem for i, problem in enumerate(found) if problem is not None}
