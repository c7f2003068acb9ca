"""A dataset's splits before the run's own splitting: labels known, images decoded on demand.

:func:`rifle.data.build_data` selects by label (``--train-per-class``, the validation carve,
``--train-fraction``) and only then takes the images: an image folder's decoded tensors are indexed, a
published dataset decodes just the images selected (Food-101-30 decodes 30 of 750 training images per
class).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.seeding import generator
from .cache import ImageTensorSet
from .disk_cache import decode_files
from .folder import check_unreadable
from .published import DataSpec, SourceIndex, find_root

__all__ = ["SPLIT_SEED", "SplitSource", "per_class_split", "published_sources", "decode_index_split"]

SPLIT_SEED = 0  # the seed of --train-per-class's draw: fixed, so every run seed sees the same images


@dataclass
class SplitSource:
    """One split's ``labels`` and ``take(positions) -> ImageTensorSet`` (``None``: every image).

    ``skipped`` collects the positions whose images could not be read (``--skip-bad-images``): a taken
    set lacks them, and :meth:`kept` drops them from a position list."""

    labels: torch.Tensor
    _take: Callable[[torch.Tensor | None], ImageTensorSet]
    skipped: set[int] = field(default_factory=set)

    def take(self, positions: torch.Tensor | None) -> ImageTensorSet:
        if positions is not None and torch.equal(positions, torch.arange(len(self.labels))):
            positions = None
        return self._take(positions)

    def kept(self, positions: torch.Tensor) -> torch.Tensor:
        if not self.skipped:
            return positions
        return positions[~torch.isin(positions, torch.tensor(sorted(self.skipped), dtype=torch.int64))]

    @classmethod
    def of(cls, ds: ImageTensorSet) -> SplitSource:
        return cls(ds.labels, lambda pos: ds if pos is None else ds.subset(pos))


def per_class_split(
    labels: torch.Tensor, n: int, n_test: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """``(train, test, left_over, short)`` positions: per class (in label order) a permutation from
    ``generator(SPLIT_SEED, "train-per-class", class)``; its first ``n`` go to train, the next ``n_test``
    to test, the rest are left over. ``short`` lists the classes with fewer than ``n + n_test`` images
    (train takes first, then test). Each output is sorted."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    train, test, rest, short = [], [], [], []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=generator(SPLIT_SEED, "train-per-class", c))]
        if len(order) < n + n_test:
            short.append(c)
        train.append(order[:n])
        test.append(order[n : n + n_test])
        rest.append(order[n + n_test :])

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.int64)

    return cat(train), cat(test), cat(rest), short


def decode_index_split(
    paths: list[Path],
    labels: list[int],
    res: int,
    *,
    title: str,
    split: str,
    skip_bad_images: bool,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[ImageTensorSet, list[int], list[str]]:
    """Decode ``paths`` through the decode cache (:func:`~rifle.data.disk_cache.decode_files`) into a
    set; unreadable files raise a :class:`DataError` naming them, or are skipped. Returns the set, the
    positions in ``paths`` it holds, and the skipped files."""
    dec = decode_files(paths, res, desc=f"decoding {title} {split}", cache_dir=cache_dir)
    check_unreadable(dec.errors, f"{title} ({split} split)", skip_bad_images=skip_bad_images)
    ys = torch.tensor([labels[i] for i in dec.ok], dtype=torch.int64)
    return ImageTensorSet(dec.images, ys), dec.ok, [str(p) for p, _ in dec.errors]


def published_sources(
    spec: DataSpec,
    res: int,
    *,
    skip_bad_images: bool = False,
    cache_dir: str | os.PathLike | None = None,
    whole: bool = True,
) -> tuple[dict[str, SplitSource], list[str], dict]:
    """The :class:`SplitSource` of each split of a published dataset, its classes and ``source_info``
    (root, protocol, official split sizes, options, skipped files).

    ``whole``: a split is decoded whole on its first take (one decode-cache entry per split, shared by
    every seed; a take is a view of it); otherwise each take decodes only the images it selects (with
    ``--train-per-class``: Food-101-30 decodes 30 of 750 training images per class)."""
    reader = spec.reader
    root = find_root(reader, spec.root)
    index: SourceIndex = reader.read(root, dict(spec.options))
    index.check(reader.title)
    skipped: list[str] = []
    info = {
        "dataset": reader.title,
        "root": str(root.resolve()),
        "options": dict(spec.options),
        "official_sizes": {s: len(p) for s, (p, _) in index.splits.items()},
        **index.info,
        "skipped": skipped,
    }

    def source(split: str) -> SplitSource:
        paths, labels = index.splits[split]
        ys = torch.tensor(labels, dtype=torch.int64)

        decoded: list[tuple[ImageTensorSet, list[int]]] = []  # the whole split, once

        def decode(sel: list[int]) -> tuple[ImageTensorSet, list[int]]:
            """The images at ``sel`` and the positions (in the split) of those that decoded."""
            ds, ok, bad = decode_index_split(
                [paths[i] for i in sel],
                [labels[i] for i in sel],
                res,
                title=reader.title,
                split=split,
                skip_bad_images=skip_bad_images,
                cache_dir=cache_dir,
            )
            kept = [sel[j] for j in ok]
            out.skipped.update(set(sel) - set(kept))
            skipped.extend(b for b in bad if b not in skipped)
            return ds, kept

        def take(pos: torch.Tensor | None) -> ImageTensorSet:
            if not whole:
                return decode(list(range(len(paths))) if pos is None else pos.tolist())[0]
            if not decoded:
                decoded.append(decode(list(range(len(paths)))))
            ds, kept = decoded[0]
            if pos is None:
                return ds
            row = {i: r for r, i in enumerate(kept)}
            return ds.subset([row[i] for i in pos.tolist() if i in row])

        out = SplitSource(ys, take)
        return out

    return {s: source(s) for s in index.splits}, list(index.classes), info
