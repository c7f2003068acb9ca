"""Decoded images as one uint8 tensor, and cheap batched augmentation on top of it.

Images are decoded once, resized and centre-cropped to ``R = cache_resolution(S)`` (the paper's Resize
256 -> crop 224 ratio) and kept as ``uint8 [N, C, R, R]``; :func:`train_batches` (RandomCrop + flip) and
:func:`eval_batches` (CenterCrop) cut normalised batches from it with tensor ops, every random draw a
function of (run seed, purpose, epoch) and the dataset index. :func:`stratified_split` is the one
splitting rule. Details and why: docs/data.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
import torch

from ..core.seeding import generator

__all__ = [
    "ImageTensorSet",
    "cache_resolution",
    "train_batches",
    "eval_batches",
    "num_batches",
    "samples_per_rank",
    "last_batch_dropped",
    "stratified_split",
]


class ImageTensorSet:
    """Decoded images of one split: ``images`` uint8 ``[N, C, R, R]`` (C = 1 or 3), ``labels`` int64 ``[N]``.

    Grayscale data keeps one channel here (a third of the memory); batches expand it to 3 channels.
    With ``index`` (int64 ``[N]``) the set is a view: image ``i`` is row ``index[i]`` of ``base`` (the
    tensor passed as ``images``, e.g. memory-mapped from the decode cache); :meth:`subset` makes such
    views instead of copies, and batches gather straight from ``base``. ``.images`` of a view is
    materialised on first use (a copy, kept); training and evaluation never ask for it.
    Treat the tensors as read-only: they are shared (the in-process and the disk caches).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], index: torch.Tensor | None = None
    ) -> None:
        imgs = images
        if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8 or imgs.dim() != 4:
            raise ValueError(
                "images must be a uint8 tensor [N, C, R, R]; got "
                f"{getattr(imgs, 'dtype', type(imgs))} {tuple(getattr(imgs, 'shape', ()))}"
            )
        if imgs.shape[1] not in (1, 3) or imgs.shape[2] != imgs.shape[3]:
            raise ValueError(f"images must be [N, C, R, R] with C in {{1, 3}}; got {tuple(imgs.shape)}")
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-d integer tensor; got {labels.dtype} {tuple(labels.shape)}")
        if index is not None:
            index = torch.as_tensor(index).to(torch.int64).flatten()
            if index.shape[0] != labels.shape[0]:
                raise ValueError(f"{index.shape[0]} indices but {labels.shape[0]} labels")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= imgs.shape[0]):
                raise ValueError(f"index out of range for {imgs.shape[0]} images")
        elif labels.shape[0] != imgs.shape[0]:
            raise ValueError(f"{imgs.shape[0]} images but {labels.shape[0]} labels")
        self.base = imgs.contiguous()
        self.index = index
        self.labels = labels.to(torch.int64).contiguous()
        self._images: torch.Tensor | None = None

    def __repr__(self) -> str:
        view = f", a view of {self.base.shape[0]} images" if self.index is not None else ""
        return f"ImageTensorSet({len(self)} images {tuple(self.base.shape[1:])}{view})"

    @property
    def images(self) -> torch.Tensor:
        """uint8 ``[N, C, R, R]``: ``base`` itself, or for a view its rows, copied once and kept."""
        if self.index is None:
            return self.base
        if self._images is None:
            self._images = self.base[self.index]
        return self._images

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows of ``base`` holding images ``idx`` of this set."""
        return idx if self.index is None else self.index[idx]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.base.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.base.shape[-1])

    def subset(self, idx: torch.Tensor | Sequence[int]) -> ImageTensorSet:
        """The images at ``idx`` (in the given order): a view of the same ``base``, nothing copied. A
        boolean mask is accepted too."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).flatten()
        return ImageTensorSet(self.base, self.labels[idx], index=self.rows(idx))

    def with_labels(self, labels: torch.Tensor) -> ImageTensorSet:
        """The same images (shared, not copied) with other labels."""
        return ImageTensorSet(self.base, labels, index=self.index)

    def class_counts(self, num_classes: int | None = None) -> list[int]:
        n = num_classes if num_classes is not None else (int(self.labels.max()) + 1 if len(self) else 0)
        return torch.bincount(self.labels, minlength=n).tolist()


def cache_resolution(image_size: int) -> int:
    """The cached side length for a training crop of ``image_size``: ``round(S * 8 / 7)`` (224 -> 256)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return round(image_size * 8 / 7)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches that ``n`` samples make: ``n // B`` with ``drop_last``, else ``ceil(n / B)``.

    For :func:`train_batches` on several ranks pass ``n = samples_per_rank(len(ds), world_size)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n // batch_size if drop_last else -(-n // batch_size)


def last_batch_dropped(n: int, batch_size: int, chunks: int = 1) -> bool:
    """Whether training drops the last, incomplete batch of ``n`` samples: only when it would give a
    micro-batch of a single sample (BatchNorm cannot train on one value per channel).

    ``chunks`` is the number of micro-batches a batch is cut into with ``torch.chunk`` (``--grad-accum``):
    a remainder ``r`` gives chunks of ``ceil(r / chunks)`` and a last chunk of ``r mod`` that. Every other
    incomplete batch is trained on, so only training sets of such sizes differ from earlier versions.
    """
    r = n % batch_size
    if r == 0:
        return False
    size = -(-r // chunks)
    return size == 1 or r % size == 1


def samples_per_rank(n: int, world_size: int) -> int:
    """Samples each rank gets from :func:`train_batches` (padded like ``DistributedSampler``)."""
    return -(-n // world_size) if n else 0


def _check_common(ds: ImageTensorSet, batch_size: int, image_size: int, rank: int, world_size: int) -> None:
    if not isinstance(ds, ImageTensorSet):
        raise TypeError(f"expected an ImageTensorSet, got {type(ds).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size > ds.resolution:
        raise ValueError(
            f"image_size {image_size} is larger than the cached resolution {ds.resolution}; "
            f"decode the data at cache_resolution({image_size}) = "
            f"{cache_resolution(image_size)}"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _affine(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale, shift`` (float32 [3]) with ``x_u8 * scale + shift == (x/255 - mean)/std``."""
    m = torch.as_tensor(mean, dtype=torch.float64).flatten()
    s = torch.as_tensor(std, dtype=torch.float64).flatten()
    if m.numel() == 1:
        m = m.expand(3)
    if s.numel() == 1:
        s = s.expand(3)
    if m.numel() != 3 or s.numel() != 3:
        raise ValueError(f"mean and std need 1 or 3 values, got {m.numel()} and {s.numel()}")
    if not bool((s > 0).all()):
        raise ValueError(f"std must be positive, got {s.tolist()}")
    return (1.0 / (255.0 * s)).float(), (-m / s).float()


@functools.lru_cache(maxsize=32)
def _offsets(c: int, r: int, size: int) -> torch.Tensor:
    """Flat offsets int64 ``[2, C, S, S]`` of a ``size`` crop at (0, 0) of a ``[C, r, r]`` image.

    ``[0]`` reads the crop as is, ``[1]`` reads it mirrored left-right.
    """
    ar = torch.arange(size)
    rows = (torch.arange(c) * (r * r))[:, None, None] + (ar * r)[None, :, None]
    return torch.stack([rows + ar[None, None, :], rows + (size - 1 - ar)[None, None, :]])


def _crop_batch(
    images: torch.Tensor,
    idx: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor | None,
    size: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    channels_last: bool,
) -> torch.Tensor:
    """Crop ``size x size`` at (top, left) of ``images[idx]`` (optionally mirrored), normalise, to 3 channels.

    One ``take`` over flat indices (image base + a cached per-shape offset grid): no per-image Python work,
    no copy of whole images, and few tensor ops per batch (each op is a thread-pool round trip).
    """
    _, c, r, _ = images.shape
    grid = _offsets(c, r, size)
    base = (idx * (c * r * r) + top * r + left).view(-1, 1, 1, 1)
    lin = base + (grid[flip.long()] if flip is not None else grid[0])
    u = images.reshape(-1).take(lin)  # uint8 [B, C, S, S]; NCHW order keeps the reads local
    if c == 1:  # grayscale: one multiply-add broadcasts to 3 channels, written straight in the target layout
        if channels_last:
            return torch.addcmul(shift, u.permute(0, 2, 3, 1).float(), scale).permute(0, 3, 1, 2)
        return torch.addcmul(shift.view(1, 3, 1, 1), u.float(), scale.view(1, 3, 1, 1))
    x = u.float().mul_(scale.view(1, 3, 1, 1)).add_(shift.view(1, 3, 1, 1))  # measured faster than addcmul
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_batches(
    ds: ImageTensorSet,
    batch_size: int,
    image_size: int,
    mean,
    std,
    *,
    seed: int,
    epoch: int,
    drop_last: bool = False,
    channels_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented training batches ``(x float32 [B, 3, S, S], y int64 [B])`` for one epoch.

    * order: ``torch.randperm(N, generator=generator(seed, "order", epoch))``;
    * augmentation: from ``generator(seed, "augment", epoch)``, drawn up front in this order:
      ``top = randint(0, R-S+1, (N,))``, ``left = randint(0, R-S+1, (N,))``, ``flip = randint(0, 2, (N,))``,
      indexed by dataset index (independent of batch size, ``drop_last``, rank and world size);
    * sharding: the permutation is padded by wrapping around to a multiple of ``world_size`` and rank
      ``r`` takes positions ``r, r + W, r + 2W, ...`` (as ``torch.utils.data.DistributedSampler``), so every
      rank gets ``samples_per_rank(N, W)`` samples and, without padding, the ranks are disjoint;
    * grayscale (C = 1) is expanded to 3 channels; ``channels_last`` returns ``torch.channels_last`` x.

    Argument errors are raised at the call, not at the first ``next()``.
    """
    _check_common(ds, batch_size, image_size, rank, world_size)
    scale, shift = _affine(mean, std)
    n, r = len(ds), ds.resolution
    order = torch.randperm(n, generator=generator(seed, "order", epoch))
    g = generator(seed, "augment", epoch)
    top = torch.randint(0, r - image_size + 1, (n,), generator=g)
    left = torch.randint(0, r - image_size + 1, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g).bool()
    if world_size > 1 and n:
        total = samples_per_rank(n, world_size) * world_size
        order = order.repeat(-(-total // n))[:total][rank::world_size]
    nb = num_batches(len(order), batch_size, drop_last)

    def _gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(nb):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = _crop_batch(
                ds.base, ds.rows(idx), top[idx], left[idx], flip[idx], image_size, scale, shift, channels_last
            )
            yield x, ds.labels[idx]

    return _gen()


def eval_batches(
    ds: ImageTensorSet,
    batch_size: int,
    image_size: int,
    mean,
    std,
    *,
    channels_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """CenterCrop(S) batches in dataset order, no randomness, never padded or dropped.

    Centre offset ``round((R - S) / 2)`` as torchvision's ``CenterCrop``. With ``world_size > 1`` rank ``r``
    gets the *contiguous* block ``[r*N//W, (r+1)*N//W)``: blocks differ in size by at most one and every
    sample is evaluated exactly once, so sum correct counts / losses across ranks (``all_reduce``), do not
    average per-rank accuracies.
    """
    _check_common(ds, batch_size, image_size, rank, world_size)
    scale, shift = _affine(mean, std)
    n, r = len(ds), ds.resolution
    off = int(round((r - image_size) / 2.0))
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size

    def _gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(lo, hi, batch_size):
            idx = torch.arange(start, min(start + batch_size, hi))
            pos = torch.full_like(idx, off)
            x = _crop_batch(ds.base, ds.rows(idx), pos, pos, None, image_size, scale, shift, channels_last)
            yield x, ds.labels[idx]

    return _gen()


def stratified_split(
    strata: torch.Tensor | Sequence[int],
    fraction: float,
    gen: torch.Generator,
    *,
    min_taken: int = 0,
    min_left: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into ``(taken, left)`` with about ``fraction`` of every stratum taken.

    The total taken is ``round(fraction * N)``, shared out over strata by largest remainder of
    ``fraction * n_s`` (ties broken at random), so small classes are not all rounded to zero; each stratum
    keeps at least ``min_taken`` in ``taken`` and ``min_left`` in ``left`` where it has that many images
    (these floors may push the total above the target). Within a stratum the taken images are the first
    ``k_s`` of a random permutation of its indices (drawn from ``gen`` in sorted stratum order), so a smaller
    fraction takes a prefix of the same order. Both outputs are sorted.
    """
    strata = torch.as_tensor(strata, dtype=torch.int64).flatten()
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = int(strata.numel())
    keys = torch.unique(strata).tolist()  # sorted
    members = [(strata == k).nonzero().flatten() for k in keys]
    sizes = [int(m.numel()) for m in members]
    lo = [min(min_taken, s) for s in sizes]
    hi = [max(lo_s, s - min(min_left, s)) for lo_s, s in zip(lo, sizes)]
    quota = [fraction * s for s in sizes]
    alloc = [min(max(math.floor(q + 1e-9), a), b) for q, a, b in zip(quota, lo, hi)]
    target = min(max(round(fraction * n), sum(lo)), sum(hi))
    tiebreak = torch.randperm(len(keys), generator=gen).tolist() if keys else []
    remainder = [q - math.floor(q + 1e-9) for q in quota]
    rank_order = sorted(range(len(keys)), key=lambda i: (-remainder[i], tiebreak[i]))
    while sum(alloc) < target:
        progressed = False
        for i in rank_order:
            if sum(alloc) >= target:
                break
            if alloc[i] < hi[i]:
                alloc[i] += 1
                progressed = True
        if not progressed:
            break
    taken, left = [], []
    for m, k in zip(members, alloc):
        p = m[torch.randperm(m.numel(), generator=gen)]
        taken.append(p[:k])
        left.append(p[k:])

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.sort(torch.cat(xs)).values if xs else torch.zeros(0, dtype=torch.int64)

    return cat(taken), cat(left)
