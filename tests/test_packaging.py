"""The distribution users install: build the wheel, install it into a fresh venv outside the checkout, run
``rifle --help`` and a 2-epoch ``rifle train`` on digits there.

The distribution is ``rifle-finetune`` (``rifle`` on PyPI is an unrelated RISC-V tool); the import name
and the command stay ``rifle``. Nothing is downloaded: the wheel is built without build isolation (this
interpreter's setuptools) from a copy of the sources, and the fresh venv sees this environment's locked
packages read-only through a ``.pth`` line, so ``pip install --no-index WHEEL[extras]`` must resolve every
requirement of the extras against them (a missing or conflicting one fails the install) and ``pip check``
must pass. Slow (about a minute on 2 busy cores): builds, installs and trains in child processes.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "offline,lightning,transformers,report,export"


def sh(argv, cwd, env=None, timeout=600):
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.extended
def test_wheel_installs_in_a_fresh_venv_and_trains_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools")
    t = {}
    # 1. the wheel, from a copy of what the distribution is made of (the checkout stays untouched)
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    t0 = time.perf_counter()
    sh(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            tmp_path / "dist",
            src,
        ],
        cwd=tmp_path,
    )
    t["wheel"] = time.perf_counter() - t0
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("rifle_finetune-0.1.0-py3-none-any"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"rifle"}
    assert "rifle/train/loggers.py" in names and "rifle/methods/rifle.py" in names
    assert re.search(r"^Name: rifle-finetune$", meta, re.M)
    for extra in EXTRAS.split(","):
        assert re.search(rf"^Provides-Extra: {extra}$", meta, re.M), extra
    assert "rifle = rifle.cli:main" in entry

    # 2. a fresh venv that sees this environment's locked packages (read-only), nothing else
    t0 = time.perf_counter()
    venv = tmp_path / "venv"
    # --without-pip: ensurepip's own pip/setuptools would shadow the locked ones (torch needs setuptools>=77)
    sh([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(
        sh(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
        ).stdout.strip()
    )
    (site / "locked_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"
    sh([py, "-m", "pip", "install", "--no-index", f"{wheel}[{EXTRAS}]"], cwd=tmp_path, env=env)
    sh([py, "-m", "pip", "check"], cwd=tmp_path, env=env)
    t["venv+install"] = time.perf_counter() - t0

    # 3. outside the checkout: the installed package, its command, a 2-epoch run on digits
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = sh([py, "-c", "import rifle; print(rifle.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout's sources
    rifle = venv / "bin" / "rifle"
    out = sh([rifle, "--help"], cwd=work, env=env).stdout
    assert "train" in out and "report" in out
    t0 = time.perf_counter()
    run = sh(
        [
            rifle,
            "train",
            "--data",
            "digits",
            "--model",
            "tiny_cnn",
            "--epochs",
            "2",
            "--image-size",
            "16",
            "--batch-size",
            "64",
            "--train-fraction",
            "0.3",
            "--method",
            "rifle",
            "--reinits",
            "1",
            "--min-steps-after",
            "0",
            "--out",
            "runs/two",
        ],
        cwd=work,
        env=env,
    )
    t["train"] = time.perf_counter() - t0
    assert "done: final test acc" in run.stdout
    for f in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoint.safetensors"):
        assert (work / "runs" / "two" / f).is_file(), f
    assert list((work / "runs" / "two" / "tb").glob("events.out.tfevents.*"))  # report extra: tensorboard
    print("packaging timings (s):", {k: round(v, 1) for k, v in t.items()})
