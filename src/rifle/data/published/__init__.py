"""Published datasets read where their archives extract: ``--data NAME[,KEY=VALUE...]:ROOT``.

One module per dataset registers a :class:`Reader` (``READERS``); each reads the dataset's own index
files into a :class:`SourceIndex` (image paths and labels per official split, class names from the
dataset's files). Decoding, the validation split and ``--train-per-class`` are shared
(:func:`rifle.data.build_data`). Layouts, protocols and sources: docs/data.md "Published datasets".
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..folder import DataError

__all__ = [
    "READERS",
    "Reader",
    "SourceIndex",
    "DataSpec",
    "parse_spec",
    "find_root",
    "require",
    "read_lines",
    "read_mat",
    "published_fingerprint",
    "register",
]


@dataclass
class SourceIndex:
    """What a reader found: ``splits`` maps "train", "test" and (official only) "val" to ``(paths,
    labels)``; ``classes`` are the class names in label order; ``info`` is recorded in ``data_info``
    (``source_info``): the files read, the protocol, and anything the reader decided."""

    splits: dict[str, tuple[list[Path], list[int]]]
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    index_files: list[Path] = field(default_factory=list)  # the files read (fingerprinted)

    def check(self, title: str) -> None:
        """Consistent labels and non-empty official splits (a reader's own bug or a damaged copy)."""
        for split, (paths, labels) in self.splits.items():
            if len(paths) != len(labels):
                raise DataError(f"{title}: {split} split has {len(paths)} images but {len(labels)} labels")
            if not paths and split != "val":
                raise DataError(f"{title}: the {split} split lists no images")
            bad = [y for y in labels if not 0 <= y < len(self.classes)]
            if bad:
                raise DataError(f"{title}: {split} label {bad[0]} outside 0..{len(self.classes) - 1}")


@dataclass(frozen=True)
class Reader:
    """A published dataset: ``read(root, options) -> SourceIndex`` on the folder found by
    :func:`find_root` (the one holding ``marker``)."""

    name: str  # --data NAME:ROOT
    title: str  # "CUB-200-2011"
    marker: str  # a path under ROOT that only this dataset's root holds, e.g. "images.txt"; "a|b": either
    layout: str  # the expected layout, shown in errors (indented lines)
    read: Callable[[Path, dict[str, Any]], SourceIndex]
    options: dict[str, Any] = field(default_factory=dict)  # NAME,KEY=VALUE options and their defaults
    choices: dict[str, Sequence[Any]] = field(default_factory=dict)  # allowed values per option
    official_val: bool = False  # the dataset has an official validation split (used as val)
    test_per_class: int | None = None  # no official split: --train-per-class N, then this many to test
    source: str = ""  # where to get it (docs/reproduce.md has more)

    def expected(self) -> str:
        return f"expected layout of {self.title} (--data {self.name}:ROOT):\n{self.layout}"


READERS: dict[str, Reader] = {}


def register(reader: Reader) -> Reader:
    if reader.name in READERS:
        raise ValueError(f"published dataset {reader.name!r} registered twice")
    READERS[reader.name] = reader
    return reader


def _load_all() -> None:
    for m in pkgutil.iter_modules(__path__):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}")


@dataclass(frozen=True)
class DataSpec:
    """``--data NAME[,KEY=VALUE...]:ROOT`` parsed: the reader, its options (defaults filled in)."""

    reader: Reader
    root: str
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.reader.name

    @property
    def label(self) -> str:
        """``NAME[,KEY=VALUE...]`` (options that differ from the defaults): a folder-safe dataset name."""
        opts = "".join(f",{k}={v}" for k, v in sorted(self.options.items()) if self.reader.options[k] != v)
        return f"{self.reader.name}{opts}"

    def canonical(self, root: str | None = None) -> str:
        opts = "".join(f",{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.reader.name}{opts}:{self.root if root is None else root}"


def _coerce(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(value)
    return value


def parse_spec(text: str | os.PathLike) -> DataSpec | None:
    """``NAME[,KEY=VALUE...]:ROOT`` with NAME a published dataset (case-insensitive) -> :class:`DataSpec`;
    None for anything else (a built-in name or a path). A NAME close to a published one, or a bad option,
    is a :class:`DataError`."""
    text = os.fspath(text)
    head, sep, root = text.partition(":")
    if not sep or not head or "/" in head or os.sep in head:
        return None
    _load_all()
    name, *opts = head.split(",")
    name = name.strip().lower()
    if name not in READERS:
        if Path(text).expanduser().exists():
            return None  # a folder whose name holds a colon
        close = difflib.get_close_matches(name, list(READERS), n=3, cutoff=0.6)
        if not close:
            return None
        raise DataError(
            f"unknown published dataset {name!r} in --data {text}: did you mean "
            f"{' or '.join(repr(c) for c in close)}? Published datasets: {', '.join(sorted(READERS))}"
        )
    reader = READERS[name]
    if not root.strip():
        raise DataError(f"--data {text}: no ROOT after '{name}:' (the folder the archive extracts to)")
    options = dict(reader.options)
    for item in opts:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in reader.options:
            allowed = ", ".join(f"{k}={v}" for k, v in reader.options.items()) or "none"
            raise DataError(f"--data {text}: unknown option {item!r} of {name} (options: {allowed})")
        try:
            options[key] = _coerce(value.strip(), reader.options[key])
        except ValueError:
            raise DataError(f"--data {text}: {key}={value!r} is not a valid {key}") from None
        if key in reader.choices and options[key] not in reader.choices[key]:
            raise DataError(
                f"--data {text}: {key}={value} is not one of {', '.join(map(str, reader.choices[key]))}"
            )
    return DataSpec(reader, root.strip(), options)


def find_root(reader: Reader, root: str | os.PathLike) -> Path:
    """The folder holding ``reader.marker``: ``root`` itself, or its one sub-folder (at most two levels
    down) that does; otherwise a :class:`DataError` showing the expected layout."""
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "does not exist" if not base.exists() else "is not a folder"
        raise DataError(f"{reader.title}: {base} {what}.\n{reader.expected()}")
    markers = reader.marker.split("|")  # "a|b": either (a dataset published in two layouts)
    if any((base / m).exists() for m in markers):
        return base
    # a marker "data/x.txt" found at base/sub/data/x.txt means ROOT base/sub (not base/sub/data)
    found = sorted({p.parents[len(Path(m).parts) - 1] for m in markers for p in base.glob(f"*/{m}")})
    if not found:
        found = sorted({p.parents[len(Path(m).parts) - 1] for m in markers for p in base.glob(f"*/*/{m}")})
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(
            f"{reader.title}: {base} holds several copies ({', '.join(map(str, found))}): pass one of them"
        )
    raise DataError(
        f"{reader.title}: {' or '.join(str(base / m) for m in markers)} not found (nor in a sub-folder of "
        f"{base}): ROOT is the folder the official archive extracts to.\n{reader.expected()}"
    )


def require(reader: Reader, root: Path, *relpaths: str) -> list[Path]:
    """``root / rel`` for each path, which must exist; the first missing one is named in a
    :class:`DataError` with the expected layout."""
    out = [root / rel for rel in relpaths]
    for p in out:
        if not p.exists():
            raise DataError(f"{reader.title}: missing {p}.\n{reader.expected()}")
    return out


def read_lines(reader: Reader, path: Path) -> list[str]:
    """The non-empty, stripped lines of an index file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [s for s in (line.strip() for line in f) if s]
    except OSError as e:
        raise DataError(f"{reader.title}: cannot read {path}: {e}.\n{reader.expected()}") from None
    except UnicodeDecodeError:
        raise DataError(f"{reader.title}: {path} is not a text file.\n{reader.expected()}") from None


def read_mat(reader: Reader, path: Path) -> dict[str, Any]:
    """A MATLAB ``.mat`` file through ``scipy.io.loadmat`` (``squeeze_me``)."""
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=True)
    except Exception as e:  # noqa: BLE001 - scipy raises several kinds for a damaged file
        raise DataError(
            f"{reader.title}: cannot read {path} as a .mat file ({e}).\n{reader.expected()}"
        ) from None


def missing_images(reader: Reader, paths: Sequence[Path], index_file: Path | str) -> None:
    """Raise naming the first listed image that does not exist (a partial copy)."""
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise DataError(
            f"{reader.title}: {len(absent)} of the {len(paths)} images listed in {index_file} are missing, "
            f"e.g. {absent[0]} (a partial or moved copy?).\n{reader.expected()}"
        )


def published_fingerprint(spec: DataSpec) -> dict[str, Any]:
    """What a run records of a published dataset (cheap: ``os.stat`` only): the index files' sizes and
    times, and the count and a SHA-256 over (path, size, mtime) of every listed image."""
    root = find_root(spec.reader, spec.root)
    index = spec.reader.read(root, dict(spec.options))
    h = hashlib.sha256()
    n = 0
    for split in sorted(index.splits):
        for p in index.splits[split][0]:
            st = p.stat()
            h.update(f"{split}\0{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            n += 1
    files = {}
    for p in index.index_files:
        st = p.stat()
        files[str(p.relative_to(root))] = [st.st_size, st.st_mtime_ns]
    return {
        "kind": "published",
        "name": spec.name,
        "options": dict(sorted(spec.options.items())),
        "root": str(root.resolve()),
        "index_files": files,
        "images": n,
        "images_sha256": h.hexdigest(),
    }
