"""Built-in datasets that work offline: ELPV (PyPI ``elpv-dataset``) and scikit-learn's digits.

ELPV: Buerhop-Lutz et al., "A Benchmark for Visual Identification of Defective Solar Cells in
Electroluminescence Imagery", EU PVSEC 2018; Deitsch et al., "Automatic classification of defective
photovoltaic module cells in electroluminescence images", Solar Energy 2019 (arXiv 1807.02894). 2,624
solar-cell images, 4 defect-probability classes; data licence CC BY-NC-SA 4.0. Both datasets have a
fixed train/test split; ELPV is decoded through the decode cache (docs/data.md).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.seeding import generator
from .cache import ImageTensorSet, stratified_split
from .disk_cache import decode_files
from .decode import DataError

__all__ = [
    "BUILTIN",
    "ELPV_CLASSES",
    "ELPV_SPLIT_SEED",
    "DIGITS_SPLIT_SEED",
    "elpv_files",
    "load_elpv",
    "load_digits_dataset",
    "clear_memory_cache",
]

ELPV_CLASSES = ["functional", "possibly_defective", "likely_defective", "defective"]
ELPV_TYPES = ["mono", "poly"]
ELPV_SPLIT_SEED = 20200712  # constant: the ELPV test split never changes with the run seed
DIGITS_SPLIT_SEED = 1797
TEST_FRACTION = 0.25

_MEMORY: dict[tuple[str, int], tuple[dict[str, ImageTensorSet], list[str], dict]] = {}

Loader = Callable[..., "tuple[dict[str, ImageTensorSet], list[str], dict]"]  # (res, *, cache_dir)


def clear_memory_cache() -> None:
    """Forget the in-process cache (the disk cache stays)."""
    _MEMORY.clear()


def _check_res(res: int) -> None:
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise ValueError(f"res must be a positive integer, got {res!r}")


def _from_memory(key: tuple[str, int]):
    splits, classes, info = _MEMORY[key]
    return dict(splits), list(classes), copy.deepcopy(info)


def _split_fixed(
    images: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor, seed: int, name: str
) -> tuple[dict[str, ImageTensorSet], dict[str, torch.Tensor]]:
    """The fixed split: 25% of every stratum to test, from ``generator(seed, name + "-test-split")``."""
    index = _fixed_index(strata, seed, name)
    full = ImageTensorSet(images, labels)
    return {s: full.subset(i) for s, i in index.items()}, index


def _fixed_index(strata: torch.Tensor, seed: int, name: str) -> dict[str, torch.Tensor]:
    test, train = stratified_split(strata, TEST_FRACTION, generator(seed, f"{name}-test-split"), min_left=1)
    return {"train": train, "test": test}


# ---------------------------------------------------------------------------------------------- ELPV


def _elpv_source() -> tuple[Path, str]:
    try:
        import elpv_dataset
    except ImportError as e:
        raise DataError(
            "the built-in dataset 'elpv' needs the PyPI package elpv-dataset "
            "(pip install elpv-dataset, or pip install 'rifle[offline]')"
        ) from e
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("elpv-dataset")
    except PackageNotFoundError:
        ver = getattr(elpv_dataset, "__version__", "unknown")
    return Path(elpv_dataset.__file__).parent / "data", ver


def _read_elpv_labels(data_dir: Path) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    paths, labels, types = [], [], []
    with open(data_dir / "labels.csv", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3:
                raise DataError(f"{data_dir / 'labels.csv'}:{lineno}: expected 'path probability type'")
            p3 = float(parts[1]) * 3
            if abs(p3 - round(p3)) > 1e-6 or not 0 <= round(p3) <= 3 or parts[2] not in ELPV_TYPES:
                raise DataError(f"{data_dir / 'labels.csv'}:{lineno}: unexpected row {line.strip()!r}")
            paths.append(data_dir / parts[0])
            labels.append(round(p3))
            types.append(ELPV_TYPES.index(parts[2]))
    return paths, torch.tensor(labels, dtype=torch.int64), torch.tensor(types, dtype=torch.uint8)


def elpv_files() -> tuple[list[Path], torch.Tensor, dict[str, torch.Tensor]]:
    """ELPV's image files, their labels and the fixed split's indices (``train``, ``test``): the files
    :func:`load_elpv` decodes, for tools that read them another way (``benchmarks/vs_timm.py``)."""
    paths, labels, types = _read_elpv_labels(_elpv_source()[0])
    return paths, labels, _fixed_index(_elpv_strata(labels, types), ELPV_SPLIT_SEED, "elpv")


def _elpv_strata(labels: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    return labels * len(ELPV_TYPES) + types.long()


def load_elpv(
    res: int, *, cache_dir: str | os.PathLike | None = None
) -> tuple[dict[str, ImageTensorSet], list[str], dict]:
    """ELPV at ``res x res`` (1 channel): ``({"train", "test"}, ELPV_CLASSES, info)``; fixed 75/25 split.

    Decoded through the decode cache (:func:`rifle.data.disk_cache.decode_files`, ``cache_dir``), and
    kept in-process by ``res``."""
    _check_res(res)
    key = ("elpv", res)
    if key in _MEMORY:
        return _from_memory(key)
    data_dir, ver = _elpv_source()
    paths, labels, types = _read_elpv_labels(data_dir)
    dec = decode_files(paths, res, desc="decoding ELPV", cache_dir=cache_dir)
    if dec.errors:
        p, msg = dec.errors[0]
        raise DataError(f"cannot read ELPV image {p}: {msg} (reinstall elpv-dataset)")
    if dec.images.shape[1] != 1:
        raise DataError(f"expected grayscale ELPV images, got {dec.images.shape[1]} channels")
    cached = {"images": dec.images, "labels": labels, "types": types}
    source = "disk cache" if dec.source == "disk cache" else "decoded"
    strata = _elpv_strata(cached["labels"], cached["types"])
    splits, index = _split_fixed(cached["images"], cached["labels"], strata, ELPV_SPLIT_SEED, "elpv")
    type_counts = {
        s: {t: int((cached["types"][idx] == i).sum()) for i, t in enumerate(ELPV_TYPES)}
        for s, idx in index.items()
    }
    info = {
        "name": "elpv",
        "package": f"elpv-dataset {ver}",
        "license": "CC BY-NC-SA 4.0",
        "split": (
            f"fixed: stratified by (class, cell type), {TEST_FRACTION:.0%} test, "
            f"seed {ELPV_SPLIT_SEED}; "
            "per cell image (labels.csv has no module id, so cells of one module may be in both)"
        ),
        "cell_types": type_counts,
        "counts": {
            s: dict(zip(ELPV_CLASSES, ds.class_counts(len(ELPV_CLASSES)))) for s, ds in splits.items()
        },
        "skipped": [],
        "channels": 1,
        "resolution": res,
        "loaded_from": source,
        "cache_file": str(dec.entry) if dec.entry is not None else None,
    }
    _MEMORY[key] = (splits, list(ELPV_CLASSES), info)
    return _from_memory(key)


# -------------------------------------------------------------------------------------------- digits


def load_digits_dataset(
    res: int, *, cache_dir: str | os.PathLike | None = None
) -> tuple[dict[str, ImageTensorSet], list[str], dict]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) upscaled to ``res`` (bilinear), 1 channel.

    Made in memory in milliseconds: the decode cache is not used (``cache_dir`` is ignored).

    Values 0..16 map to 0..255 (``round(v * 255 / 16)``); fixed stratified 25% test split (seed
    :data:`DIGITS_SPLIT_SEED`).
    """
    _check_res(res)
    key = ("digits", res)
    if key in _MEMORY:
        return _from_memory(key)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the built-in dataset 'digits' needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32)).unsqueeze(1) * (255.0 / 16.0)  # [N,1,8,8]
    if res != 8:
        x = torch.nn.functional.interpolate(
            x, size=(res, res), mode="bilinear", align_corners=False, antialias=res < 8
        )
    images = x.round_().clamp_(0, 255).to(torch.uint8)
    labels = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    splits, _ = _split_fixed(images, labels, labels, DIGITS_SPLIT_SEED, "digits")
    classes = [str(i) for i in range(10)]
    info = {
        "name": "digits",
        "package": "scikit-learn load_digits",
        "license": "CC BY 4.0 (UCI Optical Recognition of Handwritten Digits)",
        "split": f"fixed: stratified by class, {TEST_FRACTION:.0%} test, seed {DIGITS_SPLIT_SEED}",
        "counts": {s: dict(zip(classes, ds.class_counts(10))) for s, ds in splits.items()},
        "skipped": [],
        "channels": 1,
        "resolution": res,
    }
    _MEMORY[key] = (splits, classes, info)
    return _from_memory(key)


BUILTIN: dict[str, Loader] = {"elpv": load_elpv, "digits": load_digits_dataset}
