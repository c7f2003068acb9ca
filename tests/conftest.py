import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
VOLATILE = {"seconds", "images_per_s"}  # metrics.jsonl fields that vary from run to run (timings)

# Keep the suite deterministic and friendly to a 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """The decode cache (rifle.data.disk_cache: image folders, ELPV) of the whole session, never ~/.cache;
    subprocesses inherit it. Session-scoped, so set before module fixtures that train (a function-scoped
    monkeypatch came after them, and their runs wrote to ~/.cache/rifle). Tests that need their own cache
    pass cache_dir= / --cache-dir, or monkeypatch RIFLE_CACHE_DIR."""
    saved = os.environ.get("RIFLE_CACHE_DIR")
    os.environ["RIFLE_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "rifle-cache")
    yield
    if saved is None:
        os.environ.pop("RIFLE_CACHE_DIR", None)
    else:
        os.environ["RIFLE_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    """Every test starts with Python's own SIGINT handler (KeyboardInterrupt), never one a library left.

    Libraries may change it for the rest of the process (Lightning sets SIG_IGN after a KeyboardInterrupt
    in fit). A fresh-clone run once failed test_faults' SIGINT checkpoint test with "DID NOT RAISE",
    which an inherited SIG_IGN explains; the cause was not pinned down further."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if saved is not None:
        signal.signal(signal.SIGINT, saved)


def leave_group():
    """A spawned DDP test worker leaves its gloo group together with the other ranks, then exits at once.

    A rank that exits with the group alive can abort ("terminate called without an active exception",
    SIGABRT; seen 1 in 3 runs in several 2-rank tests). The barrier fixed that locally, yet CI (a clean
    clone on 2 busy cores) still saw it twice in one run, both times after ``run_train`` raised: the DDP
    wrapper lived on in the exception's reference cycle and freed the group's C++ object during
    interpreter finalisation. So: ``shutdown`` (the CLI's own path) frees it first, and the worker, whose
    results are written by now, ends with ``os._exit(0)`` rather than through finalisation, which is not
    what these tests are about."""
    import torch.distributed as dist

    from rifle.train.distributed import DistInfo, shutdown

    if dist.is_initialized():
        dist.barrier()
        shutdown(DistInfo(world_size=dist.get_world_size()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_image_folder(
    root, classes=("cat", "dog", "fox"), per_class=(8, 3), size=(20, 14), splits=("train", "test")
):
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


def child_env(**overrides):
    """The environment of a child ``python`` importing this checkout's ``rifle`` (src/ first on the path)."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **overrides}


def killed_at_epoch(argv, epoch, cwd):
    """Run ``rifle <argv>`` in a child process that SIGKILLs itself when ``epoch`` starts (no clean-up)."""
    code = (
        "import os, signal, sys\n"
        "import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})  # as this process: the same sums\n"
        "from rifle.train.trainer import Trainer\n"
        "original = Trainer.train_epoch\n"
        "def train_epoch(self, epoch):\n"
        f"    if epoch == {epoch}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(self, epoch)\n"
        "Trainer.train_epoch = train_epoch\n"
        "from rifle.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr  # really killed, no clean-up ran


def metrics(path):
    """A run's metrics.jsonl rows without the timing fields (equal for identical runs)."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in (path / "metrics.jsonl").read_text().splitlines()
    ]


def run_cli(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``rifle <argv>`` run in this process."""
    from rifle.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def interrupted_at_epoch(epoch):
    """Inside the block, ``Trainer.train_epoch`` raises ``KeyboardInterrupt`` (as Ctrl-C does) when
    ``epoch`` starts."""
    from rifle.train import Trainer

    original = Trainer.train_epoch

    def train_epoch(self, e):
        if e == epoch:
            raise KeyboardInterrupt
        return original(self, e)

    Trainer.train_epoch = train_epoch
    try:
        yield
    finally:
        Trainer.train_epoch = original


def rifle_cfg(tmp_path, name="run", **kw):
    """A small validated RIFLE run config (digits, tiny_cnn, K=1, 4 epochs) in ``tmp_path / name``."""
    from rifle.config import TrainConfig

    base = dict(
        data="digits",
        model="tiny_cnn",
        method="rifle",
        reinits=1,
        epochs=4,
        image_size=16,
        batch_size=64,
        lr=0.05,
        min_steps_after=0,
        train_fraction=0.4,
        out=str(tmp_path / name),
    )
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture
def calls(monkeypatch):
    """The number of images decode_files decoded (decode_image calls)."""
    from rifle.data import decode_image, disk_cache

    n = [0]

    def counting(p, res):
        n[0] += 1
        return decode_image(p, res)

    monkeypatch.setattr(disk_cache, "decode_image", counting)
    return n
