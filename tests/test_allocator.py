"""The glibc malloc settings the ``rifle`` command applies at start-up (rifle.train.allocator).

What they are for is measured without timing: the same allocation pattern faults far fewer pages in, and a
run gives the same numbers with and without them. Each check runs in a child process, since the setting
is process-wide and once per process.
"""

import json
import platform
import subprocess
import sys

import pytest

from conftest import child_env, make_image_folder, metrics

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
# glibc's own defaults are the baseline: no malloc setting is inherited from the machine running the tests
INHERITED = ("RIFLE_MALLOC", "LD_PRELOAD", "GLIBC_TUNABLES")
INHERITED += ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")

# What an evaluation batch does to the heap: large activation buffers allocated, written and freed. Above
# 32 MiB (the largest mmap threshold glibc allows) glibc's default maps each one and unmaps it when freed,
# so every step faults all its pages in again: 2 x 40 MiB / 4 KiB pages = 20480 per step. (Smaller
# buffers, 4 x 8 MiB, were tried first: whether glibc's default trims them varied from run to run.)
PATTERN = """
import resource, sys
import torch
from rifle.train.allocator import tune_malloc
print(tune_malloc())
def step():
    bufs = [torch.ones(10 * 2 ** 20) for _ in range(2)]  # 2 x 40 MiB, every page written
    del bufs
for _ in range(5):  # warm-up: the heap grows to its size here
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _env(**kw):
    env = child_env()
    for name in INHERITED:
        env.pop(name, None)
    env.update(kw)
    return env


def _faults(**env):
    proc = subprocess.run(
        [sys.executable, "-c", PATTERN], capture_output=True, text=True, env=_env(**env), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    setting, faults = proc.stdout.split("\n")[:2]
    return setting, int(faults)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_tuned_thresholds_keep_freed_buffers_so_the_next_step_faults_no_pages_in():
    setting, default = _faults(RIFLE_MALLOC="default")
    assert setting == "not changed: RIFLE_MALLOC=default"
    # 10 steps x 80 MiB of 4 KiB pages = 204800 faults if every step's buffers went back to the kernel
    assert default > 0.9 * 204800, default
    setting, tuned = _faults()
    assert setting.startswith("glibc tuned: mmap_threshold=33554432"), setting
    assert "refused" not in setting, setting
    # tuned: the heap keeps the buffers after the warm-up (0 faults seen in 8 of 8 tries)
    assert tuned < default / 10, (tuned, default)


def test_another_allocator_preloaded_is_left_alone():
    # ld.so warns and goes on when the library is not installed: what is checked is rifle's decision
    setting, _ = _faults(LD_PRELOAD="libtcmalloc_minimal.so.4")
    assert setting == "not changed: another allocator (LD_PRELOAD=libtcmalloc_minimal.so.4)"


def test_a_run_records_the_setting_and_gives_the_same_numbers_with_and_without_it(tmp_path):
    data = make_image_folder(tmp_path / "data")
    argv = ["--data", str(data), "--model", "tiny_cnn", "--epochs", "2", "--batch-size", "4"]
    argv += ["--image-size", "16", "--method", "rifle", "--reinits", "1", "--threads", "1"]
    runs = {}
    for choice in ("default", "tuned"):
        out = tmp_path / choice
        proc = subprocess.run(
            [sys.executable, "-m", "rifle", "train", *argv, "--out", str(out)],
            capture_output=True,
            text=True,
            env=_env(RIFLE_MALLOC=choice),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        runs[choice] = (json.loads((out / "summary.json").read_text()), metrics(out))
    assert runs["default"][0]["malloc"] == "not changed: RIFLE_MALLOC=default"
    if GLIBC:
        assert runs["tuned"][0]["malloc"].startswith("glibc tuned: "), runs["tuned"][0]["malloc"]
    assert runs["default"][1] == runs["tuned"][1]  # every epoch's every number, bit for bit


def test_an_unknown_setting_is_refused_naming_the_variable(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rifle", "train", "--data", "digits", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=_env(RIFLE_MALLOC="fast"),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "RIFLE_MALLOC='fast': expected 'tuned' (rifle's default) or 'default'" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
