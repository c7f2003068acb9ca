import os

import pytest
import torch

# Keep the suite deterministic and friendly to a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # builtin datasets may cache decoded tensors on disk; keep one shared cache for the session
    monkeypatch.setenv("RIFLE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rifle-cache"))


def make_image_folder(root, classes=("cat", "dog", "fox"), per_class=(8, 3), size=(20, 14), splits=("train", "test")):
    """A tiny image folder whose classes differ by colour (learnable)."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n in zip(splits, per_class):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(size[1], size[0], 3), dtype=np.uint8)
                arr[..., c % 3] += 150
                Image.fromarray(arr).save(d / f"{i}.png")
    return root
