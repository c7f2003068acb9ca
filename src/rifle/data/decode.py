"""Decoding one image file to a uint8 tensor (:func:`decode_image`), and many with a thread pool.

The rules (modes, resize, centre crop) are in :func:`decode_image`'s docstring and docs/data.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import numpy as np
import torch
from PIL import Image

__all__ = ["DataError", "PROGRESS_MIN_FILES", "decode_image", "decode_many"]

PROGRESS_MIN_FILES = 500


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the path and what to do."""


def _num_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """'I;16*' / 'I' (16-bit range, scaled by 1/257) and 'F' (0..1 scaled by 255, else clipped) -> 'L'."""
    a = np.asarray(img).astype(np.float32)
    if img.mode == "F":
        a = a * 255.0 if a.size and float(a.max()) <= 1.0 else a
    else:
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def decode_image(path: str | os.PathLike | IO[bytes], res: int) -> torch.Tensor:
    """Decode one image to uint8 ``[C, res, res]``.

    '1', 'L', 'LA', 'I;16*', 'I', 'F' become 1-channel grayscale (16-bit scaled to 8-bit, alpha dropped);
    everything else RGB (alpha dropped, palette expanded). The shorter side is resized to ``res``
    (bilinear, antialiased; the longer side ``int(res * long / short)`` as torchvision's ``Resize``),
    then the centre ``res x res`` is cut (offset ``round((size - res) / 2)``). JPEGs are decoded at a
    reduced DCT scale when they are at least twice ``res`` (``Image.draft``). Raises PIL / OS errors for
    unreadable files.
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(None, (res, res))
        img.load()
        mode = img.mode
        if mode in ("1", "L", "LA", "La"):
            img = img.convert("L") if mode != "L" else img
        elif mode.startswith("I") or mode == "F":
            img = _to_8bit_gray(img)
        elif mode in ("P", "PA"):
            img = img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
            img = img.convert("RGB") if img.mode != "RGB" else img
        elif mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        if w <= 0 or h <= 0:
            raise OSError(f"empty image {w}x{h}")
        if w <= h:
            nw, nh = res, int(res * h / w)
        else:
            nw, nh = int(res * w / h), res
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        top, left = int(round((nh - res) / 2.0)), int(round((nw - res) / 2.0))
        a = np.asarray(img)[top : top + res, left : left + res]
    t = torch.from_numpy(np.array(a, copy=True))  # writable, contiguous, detached from PIL
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def decode_many(
    paths: Sequence[str | os.PathLike],
    res: int,
    *,
    desc: str = "decoding",
    decoder: Callable[[str | os.PathLike, int], torch.Tensor] = decode_image,
) -> list[torch.Tensor | Exception]:
    """Decode ``paths`` with a small thread pool (PIL releases the GIL); a failure is returned, not raised.

    A tqdm bar is shown for more than 500 files when stderr is a terminal.
    """

    def one(p):
        try:
            return decoder(p, res)
        except Exception as e:  # noqa: BLE001 - reported per file by the caller
            return e

    show = len(paths) > PROGRESS_MIN_FILES and sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr)
    out: list[torch.Tensor | Exception] = []
    try:
        with ThreadPoolExecutor(max_workers=_num_threads()) as pool:
            for r in pool.map(one, paths, chunksize=16):
                out.append(r)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out
