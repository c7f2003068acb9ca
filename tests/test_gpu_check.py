"""benchmarks/gpu_check.py: the skip path on a machine without CUDA (exit 77 and a clear message), bad
arguments, and (slow) the whole script run on the CPU with --device cpu --quick, which exercises every
check's code except what only CUDA has (nccl, torch.cuda.synchronize)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SRC

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(args, tmp_path, timeout=900):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_exits_77(tmp_path):
    proc = run(["--out", str(tmp_path / "gc")], tmp_path)
    assert proc.returncode == 77, proc.stdout + proc.stderr
    assert "no CUDA device here" in proc.stdout and "nothing was checked" in proc.stdout
    assert "--device cpu" in proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "gc").exists()  # nothing ran


def test_unknown_skip_is_a_clear_error(tmp_path):
    proc = run(["--skip", "compile,warp"], tmp_path)
    assert proc.returncode == 2 and "--skip compile,warp: unknown check(s) warp" in proc.stderr


def test_shell_wrapper_passes_arguments_and_exit_status(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    sh = SCRIPT.with_suffix(".sh")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [str(sh), "--out", str(tmp_path / "gc")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 77 and "no CUDA device here" in proc.stdout


@pytest.mark.slow
@pytest.mark.extended
def test_every_check_runs_on_the_cpu(tmp_path):
    # left out: compile (an inductor build), 2-process DDP and fp16 (emulated on this CPU: its ResNet-18
    # throughput step alone took over 10 minutes on the busy 2-core machine): each minutes here
    # stdout read line by line and time-stamped by this test's own clock: how long each setting took
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--quick",
        "--skip",
        "compile,ddp,fp16",
        "--repeats",
        "1",
        "--out",
        str(tmp_path / "gc"),
    ]
    stamped = []
    with (
        open(tmp_path / "stderr.txt", "w") as err,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=tmp_path) as child,
    ):
        for line in child.stdout:
            stamped.append((time.monotonic(), line.rstrip("\n")))
        code = child.wait(timeout=1800)
    stdout = "\n".join(line for _, line in stamped)
    assert code == 0, stdout[-4000:] + (tmp_path / "stderr.txt").read_text()[-4000:]
    res = json.loads((tmp_path / "gc" / "results.json").read_text())
    checks = {r["check"]: r for r in res["functional"]}
    assert set(checks) == {"bf16", "channels_last", "contiguous"}
    for name, r in checks.items():
        assert r["ok"] is True and r["problems"] == [], (name, r)
        assert len(r["train_loss"]) == 5 and r["train_loss"][-1] < r["train_loss"][0]
        assert (tmp_path / "gc" / name / "check.log").is_file()
    rows = {r["setting"]: r for r in res["throughput"]}
    assert set(rows) == {"fp32, contiguous", "fp32, channels_last", "bf16, channels_last"}
    # --quick: 64 images (4 steps of 16) per epoch. With --repeats 1 each rate is 64 / one timed epoch,
    # and a setting's three timed epochs (plus its warm-ups) happen between its "throughput: ..." line and
    # the next line the script prints, by this test's clock
    starts = [i for i, (_, line) in enumerate(stamped) if line.startswith("throughput: ")]
    assert [stamped[i][1] for i in starts] == [f"throughput: {s} ..." for s in rows]
    for i in starts:
        r = rows[stamped[i][1][len("throughput: ") : -len(" ...")]]
        window = stamped[i + 1][0] - stamped[i][0]
        epochs = [64 / r["trainer_img_s"], 64 / r["minimal_img_s"], 64 / r["bound_img_s"]]
        assert all(e > 0 for e in epochs) and sum(epochs) < window, (r, window)
        # the ratios are of the same epochs: trainer time / minimal time etc.
        assert r["trainer_over_minimal"] == pytest.approx(epochs[1] / epochs[0], rel=1e-9)
        assert r["minimal_over_bound"] == pytest.approx(epochs[2] / epochs[1], rel=1e-9)
    text = (tmp_path / "gc" / "results.md").read_text()
    for r in rows.values():  # the page shows the measured numbers
        assert (
            f"| {r['setting']} | {r['trainer_img_s']:.0f} | {r['minimal_img_s']:.0f} | "
            f"{r['bound_img_s']:.0f} | {r['trainer_over_minimal']:.3f} | "
            f"{r['minimal_over_bound']:.3f} |"
        ) in text
    assert "| bf16 | pass |" in text and "| setting | trainer | minimal loop |" in text
