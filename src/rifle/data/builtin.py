"""Built-in datasets that work offline: ELPV (PyPI ``elpv-dataset``) and scikit-learn's digits.

ELPV: Buerhop-Lutz et al., "A Benchmark for Visual Identification of Defective Solar Cells in
Electroluminescence Imagery", EU PVSEC 2018; Deitsch et al., "Automatic classification of defective
photovoltaic module cells in electroluminescence images", Solar Energy 2019 (arXiv 1807.02894). 2,624
solar-cell images, 4 defect-probability classes; data licence CC BY-NC-SA 4.0. Both datasets have a
fixed train/test split; decoded ELPV tensors are cached on disk (docs/data.md).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.seeding import generator
from .cache import ImageTensorSet, stratified_split
from .folder import DataError, decode_many

__all__ = [
    "BUILTIN",
    "ELPV_CLASSES",
    "ELPV_SPLIT_SEED",
    "DIGITS_SPLIT_SEED",
    "load_elpv",
    "load_digits_dataset",
    "cache_dir",
    "clear_memory_cache",
]

ELPV_CLASSES = ["functional", "possibly_defective", "likely_defective", "defective"]
ELPV_TYPES = ["mono", "poly"]
ELPV_SPLIT_SEED = 20200712  # constant: the ELPV test split never changes with the run seed
DIGITS_SPLIT_SEED = 1797
TEST_FRACTION = 0.25
CACHE_FORMAT = 1  # bump when decoding / resizing changes, to invalidate old disk caches

_MEMORY: dict[tuple[str, int], tuple[dict[str, ImageTensorSet], list[str], dict]] = {}

Loader = Callable[[int], "tuple[dict[str, ImageTensorSet], list[str], dict]"]


def cache_dir() -> Path:
    """``$RIFLE_CACHE_DIR`` or ``~/.cache/rifle``."""
    env = os.environ.get("RIFLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rifle"


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
    test, train = stratified_split(strata, TEST_FRACTION, generator(seed, f"{name}-test-split"), min_left=1)
    full = ImageTensorSet(images, labels)
    return {"train": full.subset(train), "test": full.subset(test)}, {"train": train, "test": test}


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


def _cache_file(name: str, ver: str, res: int) -> Path:
    return cache_dir() / f"{name}-{ver}-r{res}-f{CACHE_FORMAT}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Per-tensor byte sums: cheap (tens of ms for ELPV) and catches any single corrupted byte."""
    return ",".join(
        f"{k}:{int(tensors[k].contiguous().view(torch.uint8).sum(dtype=torch.int64))}"
        for k in sorted(tensors)
    )


def _load_disk(path: Path, meta_expected: dict[str, str], n: int, res: int):
    """The cached tensors, or ``None`` when the file is absent or unusable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in ("images", "labels", "types")}
        ok = (
            all(meta.get(k) == v for k, v in meta_expected.items())
            and t["images"].dtype == torch.uint8
            and tuple(t["images"].shape) == (n, 1, res, res)
            and t["labels"].dtype == torch.int64
            and tuple(t["labels"].shape) == (n,)
            and t["types"].dtype == torch.uint8
            and tuple(t["types"].shape) == (n,)
            and meta.get("checksum") == _checksum(t)
        )
        if not ok:
            raise ValueError("metadata, shapes or checksum do not match")
        return t
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(
            f"ignoring unusable dataset cache {path} ({type(e).__name__}: {e}); rebuilding it", stacklevel=3
        )
        return None


def _save_disk(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        os.close(fd)
        meta = {**meta, "checksum": _checksum(tensors)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path} ({e}); continuing without it", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_elpv(res: int) -> tuple[dict[str, ImageTensorSet], list[str], dict]:
    """ELPV at ``res x res`` (1 channel): ``({"train", "test"}, ELPV_CLASSES, info)``; fixed 75/25 split."""
    _check_res(res)
    key = ("elpv", res)
    if key in _MEMORY:
        return _from_memory(key)
    data_dir, ver = _elpv_source()
    paths, labels, types = _read_elpv_labels(data_dir)
    n = len(paths)
    file = _cache_file("elpv", ver, res)
    meta = {"dataset": "elpv", "version": ver, "res": str(res), "format": str(CACHE_FORMAT), "n": str(n)}
    cached = _load_disk(file, meta, n, res)
    source = "disk cache"
    if cached is None or not (torch.equal(cached["labels"], labels) and torch.equal(cached["types"], types)):
        decoded = decode_many(paths, res, desc="decoding ELPV")
        bad = [(p, e) for p, e in zip(paths, decoded) if isinstance(e, Exception)]
        if bad:
            raise DataError(f"cannot read ELPV image {bad[0][0]}: {bad[0][1]} (reinstall elpv-dataset)")
        images = torch.stack(decoded)  # type: ignore[arg-type]
        if images.shape[1] != 1:
            raise DataError(f"expected grayscale ELPV images, got {images.shape[1]} channels")
        cached = {"images": images, "labels": labels, "types": types}
        _save_disk(file, cached, meta)
        source = "decoded"
    strata = cached["labels"] * len(ELPV_TYPES) + cached["types"].long()
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
        "cache_file": str(file),
    }
    _MEMORY[key] = (splits, list(ELPV_CLASSES), info)
    return _from_memory(key)


# -------------------------------------------------------------------------------------------- digits


def load_digits_dataset(res: int) -> tuple[dict[str, ImageTensorSet], list[str], dict]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) upscaled to ``res`` (bilinear), 1 channel.

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
