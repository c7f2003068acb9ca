"""DDP on CPU with the gloo backend and 2 processes: identical replicas, divergence detected, resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import leave_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _divergence_worker(rank: int, port: int, seeds: list[int], out: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from rifle import Rifle
    from rifle.core.replicas import ReplicaDivergenceError

    _env(rank, 2, port)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    rifle = Rifle(model, None, epochs=4, reinits=1, seed=seeds[rank])
    result = "ok"
    try:
        rifle.on_epoch_start(2)
    except ReplicaDivergenceError as e:
        result = f"diverged: {e}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(result)
    leave_group()


@pytest.mark.parametrize("seeds,diverged", [([0, 0], False), ([0, 1], True)])
def test_reinit_divergence_is_detected(tmp_path, seeds, diverged):
    out = str(tmp_path / "r")
    mp.spawn(_divergence_worker, args=(free_port(), seeds, out), nprocs=2, join=True)
    results = [Path(f"{out}.{r}").read_text() for r in range(2)]
    assert all(r.startswith("diverged") == diverged for r in results), results
    if diverged:
        assert "RIFLE re-init 1" in results[0] and "ranks [1]" in results[0]


def _train_worker(rank: int, port: int, out: str, crash_at: int, resume: bool) -> None:
    from rifle.config import TrainConfig
    from rifle.run import run_train
    from conftest import interrupted_at_epoch

    _env(rank, 2, port)
    cfg = TrainConfig(
        data="digits",
        model="tiny_cnn",
        method="rifle",
        reinits=2,
        epochs=4,
        image_size=16,
        batch_size=32,
        lr=0.05,
        train_fraction=0.3,
        min_steps_after=0,
        out=out,
    ).validate()
    try:
        with interrupted_at_epoch(crash_at):  # crash_at -1: never
            run_train(cfg, resume=resume, log=lambda s: None)
    except KeyboardInterrupt:
        pass
    leave_group()


def _metrics(path):
    drop = {"seconds", "images_per_s"}
    return [
        {k: v for k, v in json.loads(line).items() if k not in drop}
        for line in (path / "metrics.jsonl").read_text().splitlines()
    ]


KINDS = ("final", "best_val", "labels")


def _predictions(path):
    with np.load(path / "predictions.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_ddp_training_identical_replicas_and_exact_resume(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    mp.spawn(_train_worker, args=(free_port(), str(full), -1, False), nprocs=2, join=True)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["ddp"]["world_size"] == 2
    sums = summary["ddp"]["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert summary["reinit_epochs"] == [1, 2]
    # interrupted after epoch 1 (the first re-init happened), then resumed under DDP
    mp.spawn(_train_worker, args=(free_port(), str(split), 2, False), nprocs=2, join=True)
    assert len(_metrics(split)) == 2
    mp.spawn(_train_worker, args=(free_port(), str(split), -1, True), nprocs=2, join=True)
    assert _metrics(split) == _metrics(full)
    assert json.loads((split / "summary.json").read_text())["final_test_acc"] == summary["final_test_acc"]
    # predictions.npz: the ranks' evaluation blocks gathered into dataset order (uneven blocks: 449 test
    # images), accuracies equal the summary's, and the resumed run's file equals the uninterrupted one's
    pf, ps = _predictions(full), _predictions(split)
    sizes = summary["data_info"]["sizes"]
    assert sizes["test"] % 2 == 1
    assert {k: len(v) for k, v in pf.items()} == {
        f"{s}_{k}": sizes[s] for s in ("test", "val") for k in KINDS
    }
    for s, key in (("test", "final_test_acc"), ("test", "test_acc_at_best_val"), ("val", "best_val_acc")):
        pred = pf[f"{s}_final" if key.startswith("final") else f"{s}_best_val"]
        assert (pred == pf[f"{s}_labels"]).sum() / sizes[s] == summary[key]
    assert (pf["val_final"] == pf["val_labels"]).sum() / sizes["val"] == summary["final_val_acc"]
    assert set(ps) == set(pf) and all(np.array_equal(pf[k], ps[k]) for k in pf)
    from rifle.evaluation import evaluate
    from rifle.inference import load

    one = evaluate(load(full), None, "test")  # one process, the saved weights, dataset order
    # every rank evaluates with rank 0's BatchNorm statistics (the saved ones): the gathered predictions
    # are those of the saved weights in one process, image by image
    assert [summary["classes"].index(r["predicted"]) for r in one["predictions"]] == pf["test_final"].tolist()


def test_torchrun_cli(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port",
            str(free_port()),
            "-m",
            "rifle",
            "train",
            "--data",
            "digits",
            "--model",
            "tiny_cnn",
            "--image-size",
            "16",
            "--epochs",
            "2",
            "--method",
            "rifle",
            "--reinits",
            "1",
            "--min-steps-after",
            "0",
            "--train-fraction",
            "0.2",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch   0") == 1  # rank 0 only logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ddp"]["world_size"] == 2
    assert summary["ddp"]["replica_checksums"][0] == summary["ddp"]["replica_checksums"][1]


def _non_finite_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 alone gets an inf in a BatchNorm buffer (rank-local) after epoch 0; each rank records how it
    ends."""
    import datetime

    import torch.distributed as dist

    from rifle.config import TrainConfig
    from rifle.run import run_train
    from rifle.train.trainer import Trainer

    _env(rank, 2, port)
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    original = Trainer.train_epoch

    def train_epoch(self, epoch):  # the fault: real non-finite weights, on rank 0 only
        row = original(self, epoch)
        if epoch == 0 and rank == 0:
            with torch.no_grad():
                dict(self.model.named_buffers())["stem.1.running_var"][0] = float("inf")
        return row

    Trainer.train_epoch = train_epoch
    cfg = TrainConfig(
        data="digits",
        model="tiny_cnn",
        epochs=3,
        image_size=16,
        batch_size=32,
        lr=0.05,
        train_fraction=0.1,
        min_steps_after=0,
        out=out,
    ).validate()
    try:
        run_train(cfg, log=lambda s: None)
        result = "finished"
    except Exception as e:  # noqa: BLE001 - what each rank ends with is the test's subject
        result = f"{type(e).__name__}: {e}"
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"result": result}, f)
    leave_group()


def test_non_finite_weights_on_rank_0_stop_every_rank_with_the_same_error(tmp_path):
    out = str(tmp_path / "run")
    mp.spawn(_non_finite_worker, args=(free_port(), out), nprocs=2, join=True)
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    expected = (
        "CheckpointError: the weights after epoch 0 are non-finite (tensor 'stem.1.running_var' holds "
        f"NaN or inf): training diverged, so they are not saved. The last good checkpoint in {out} is "
        "kept (none yet); try a lower --lr"
    )
    assert [r["result"] for r in results] == [expected, expected], results
    assert not os.path.exists(os.path.join(out, "checkpoint.safetensors"))


def test_shutdown_frees_what_a_failed_runs_traceback_holds():
    """The CLI's shutdown after an error frees the objects the traceback's frames hold (under DDP: the
    wrapper that keeps the gloo group's C++ object alive), while the error itself is still being raised."""
    import weakref

    from rifle.train.distributed import DistInfo, shutdown

    class Held:
        pass

    def failing_run(box):
        held = Held()
        held.cycle = held  # a reference cycle, as the trainer's objects have
        box.append(weakref.ref(held))
        raise RuntimeError("training failed")

    box: list = []
    try:
        failing_run(box)
    except RuntimeError as e:
        assert box[0]() is not None  # the traceback's frame keeps it
        shutdown(DistInfo(), e)
        assert box[0]() is None
        assert "failing_run" in "".join(__import__("traceback").format_tb(e.__traceback__))
