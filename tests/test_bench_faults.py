"""``rifle bench`` stopped by a real SIGTERM / Ctrl-C (SIGINT): every worker stops and keeps its last
epoch checkpoint, the exit status is 143 / 130 (as ``rifle train``), and the same command then finishes
the grid with every run exactly once."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import SRC, metrics
from rifle.experiments import grid as G
from rifle.experiments import locks as L

EPOCHS = 30  # 8 let one worker finish a run before the other had checkpointed on a quiet machine
GRID = {
    "datasets": ["digits"],
    "models": ["tiny_cnn"],
    "methods": [{"name": "finetune"}, {"name": "rifle", "reinits": 1}],
    "seeds": [0],
    "train_fractions": [0.3],
    "train": {"epochs": EPOCHS, "image_size": 16, "batch_size": 32, "lr": 0.05, "min_steps_after": 0},
}
ENV = {
    **os.environ,
    "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
    "PYTHONUNBUFFERED": "1",
}


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has ended
    except FileNotFoundError:
        return False


def _bench(grid_file, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "rifle", "bench", str(grid_file), "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def _wait_for_checkpoints(proc, runs, deadline_s=300):
    """The pids of the workers training ``runs``, once every run has an epoch checkpoint."""
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in every run"
        locks = [L.read_lock(r.path / L.LOCK) for r in runs]
        if all(locks) and all((r.path / "state.pt").is_file() for r in runs):
            return [info["pid"] for info in locks]
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(
    "signum,code,workers", [(signal.SIGTERM, 143, 2), (signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 1)]
)
def test_a_signal_to_bench_stops_every_worker_and_the_rerun_finishes_each_run_once(
    tmp_path, signum, code, workers
):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "out"
    runs = G.expand(G.parse_grid(GRID), out)[:workers]
    proc = _bench(grid_file, out, "--workers", str(workers))
    try:
        pids = _wait_for_checkpoints(proc, runs)
        if workers > 1:
            assert proc.pid not in pids and len(set(pids)) == workers  # the workers, not the parent
        os.kill(proc.pid, signum)  # the parent only, as `kill PID` or a scheduler does
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, (stdout, stderr)
    assert "Traceback" not in stderr
    for pid in pids:
        assert not _alive(pid), f"worker {pid} still runs after the parent ended"
    time.sleep(1.0)
    for r in runs:  # stopped mid-run: the checkpoint kept, nothing trained after the exit
        assert (r.path / "state.pt").is_file() and not L.is_complete(r.path), r.rel
        assert not (r.path / L.LOCK).exists()
        epochs = [m["epoch"] for m in metrics(r.path)]
        assert epochs == list(range(len(epochs))) and len(epochs) < EPOCHS
    if (signum, workers) != (signal.SIGTERM, 2):  # the re-run once (the slowest part)
        return
    again = _bench(grid_file, out, "--workers", str(workers))
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, (stdout, stderr)
    every = G.expand(G.parse_grid(GRID), out)
    done = re.findall(r"\] done +(\S+)(.*)", stdout)
    assert sorted(rel for rel, _ in done) == sorted(r.rel for r in every)  # every run, exactly once
    for r in every:
        assert L.is_complete(r.path)
        assert [m["epoch"] for m in metrics(r.path)] == list(range(EPOCHS))  # no epoch lost or repeated
    for r in runs:
        assert "(resumed)" in dict(done)[r.rel]
        assert (r.path / "train.log").read_text().count("resumed from") == 1
