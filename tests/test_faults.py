"""Faults: SIGTERM, a last batch of one image, corrupted / non-finite checkpoints, invalid state files."""

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import pytest
import torch

from conftest import metrics, run_cli as cli
from rifle.build import load_data
from rifle.config import TrainConfig
from rifle.run import run_train
from rifle.train import CheckpointError
from rifle.train.checkpoint import STATE, WEIGHTS, load_checkpoint, read_metadata, save_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cfg(out, **kw):
    base = dict(
        data="digits",
        model="tiny_cnn",
        method="finetune",
        epochs=1,
        image_size=16,
        batch_size=64,
        lr=0.05,
        train_fraction=0.2,
        threads=1,
        out=str(out),
    )
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    run_train(cfg(out), log=lambda s: None)
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of a one-epoch run folder (to damage), without summary.json: ``--resume`` loads it."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    (dst / "summary.json").unlink()
    return dst


def header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def flip_byte(path, tensor):
    """Invert one byte in the middle of ``tensor``'s data (the header stays valid)."""
    n, head = header(path)
    start, end = head[tensor]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + n + (start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def resave(path, change=None, checksum=True):
    """Rewrite ``path`` with ``change(tensors)`` applied; with or without a (recomputed) checksum."""
    from safetensors.torch import load_file, save_file

    from rifle.train.checkpoint import CHECKSUM_KEY, weights_checksum

    meta, tensors = read_metadata(path), load_file(str(path))
    if change:
        change(tensors)
    meta.pop(CHECKSUM_KEY, None)
    if checksum:
        meta[CHECKSUM_KEY] = json.dumps(weights_checksum(tensors))
    save_file(tensors, str(path), metadata=meta)


def png(tmp_path):
    from PIL import Image

    p = tmp_path / "img.png"
    Image.new("L", (8, 8), 128).save(p)
    return p


def uses_of_the_weights(run, tmp_path, capsys):
    """(name, exit code, stderr) of predict, evaluate, export and analyze on ``run``."""
    img = png(tmp_path)
    return [
        ("predict", *cli(["predict", run, img, "--device", "cpu"], capsys)[::2]),
        ("evaluate", *cli(["evaluate", run, "--device", "cpu", "--out", tmp_path / "ev"], capsys)[::2]),
        ("export", *cli(["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt"], capsys)[::2]),
        ("analyze", *cli(["analyze", run, "--out", tmp_path / "an"], capsys)[::2]),
    ]


# ------------------------------------------------------------------------------------------ SIGTERM
@pytest.mark.slow
def test_sigterm_keeps_the_checkpoint_prints_the_resume_command_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    flags = [
        "--data",
        "digits",
        "--model",
        "tiny_cnn",
        "--method",
        "finetune",
        "--epochs",
        "10",
        "--image-size",
        "16",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--train-fraction",
        "0.2",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    p = subprocess.Popen(
        [sys.executable, "-m", "rifle", "train", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 240
    while not (out / STATE).is_file():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, (stdout, stderr)
    assert "SIGTERM" in stderr and f"rifle train --out {shlex.quote(str(out))} --resume" in stderr
    assert "Traceback" not in stderr
    # the checkpoint is intact: weights and state load and agree, metrics end at the same epoch
    from rifle.models import create_model

    state = load_checkpoint(out, create_model("tiny_cnn", 10), {})
    epoch = int(state["epoch"])
    assert epoch < 9, "the run finished before the signal; make it longer"
    assert [m["epoch"] for m in metrics(out)] == list(range(epoch + 1))
    assert not (out / "summary.json").is_file()

    r = subprocess.run(
        [sys.executable, "-m", "rifle", "train", *flags, "--resume"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out} after epoch {epoch}" in r.stdout
    # the interrupted + resumed run equals an uninterrupted one, number for number
    full = tmp_path / "full"
    run_train(cfg(full, epochs=10), log=lambda s: None)
    assert metrics(out) == metrics(full)
    assert json.loads((out / "summary.json").read_text())["complete"]


class SignalDuringPickling:
    """Pickles as an empty OrderedDict (weights-only loadable) after sending ``signum`` to this process."""

    def __init__(self, signum):
        self.signum = signum

    def __reduce__(self):
        os.kill(os.getpid(), self.signum)
        return (OrderedDict, ())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_checkpoint_is_written_is_deferred_until_both_files_are_written(tmp_path, signum):
    from rifle.models import create_model
    from rifle.train.checkpoint import Terminated

    model = create_model("tiny_cnn", 10, pretrained=False)

    def state(epoch, x):
        return {"epoch": epoch, "optimizer": {}, "scheduler": {}, "methods": {"x": x}, "history": []}

    save_checkpoint(tmp_path, model, state(0, OrderedDict()), {})

    def on_sigterm(s, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)  # what `rifle` installs
    try:
        # the signal arrives after checkpoint.safetensors (epoch 1) is in place, while state.pt is pickled
        with pytest.raises(KeyboardInterrupt) as info:
            save_checkpoint(tmp_path, model, state(1, SignalDuringPickling(signum)), {})
        assert isinstance(info.value, Terminated) == (signum == signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = load_checkpoint(tmp_path, create_model("tiny_cnn", 10, pretrained=False), {})
    assert state["epoch"] == 1 and read_metadata(tmp_path / WEIGHTS)["epoch"] == "1"
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS, STATE]  # no temporary file left behind


# -------------------------------------------------------------------------- a last batch of one image
@pytest.mark.parametrize(
    "n, batch_size, grad_accum, steps", [(33, 16, 1, 2), (35, 16, 2, 2), (40, 16, 1, 3), (38, 16, 2, 3)]
)
def test_a_last_batch_that_would_train_on_one_image_is_dropped(tmp_path, n, batch_size, grad_accum, steps):
    """At 32 px EfficientNet-Lite0's last feature map is 1x1: BatchNorm cannot train on one image there.

    33 = 2*16 + 1 leaves a batch of 1; 35 = 2*16 + 3 in 2 micro-batches (torch.chunk) is 2 + 1. 40 (a last
    batch of 8) and 38 (6 = 3 + 3) train every image, as before.
    """
    c = cfg(
        tmp_path / "run",
        model="efficientnet_lite0",
        pretrained=False,
        image_size=32,
        lr=0.01,
        batch_size=batch_size,
        grad_accum=grad_accum,
        epochs=2,
    )
    data = load_data(c)
    data = dataclasses.replace(data, train=data.train.subset(range(n)))
    lines = []
    summary = run_train(c, data=data, log=lines.append)
    assert summary["complete"]
    assert any(f"{steps} steps" in s for s in lines)
    notes = [s for s in lines if "dropped" in s]
    if steps == n // batch_size:  # dropped: said once, with the count
        assert len(notes) == 1 and f"{n % batch_size} image" in notes[0] and str(n) in notes[0]
    else:
        assert notes == []


def test_drop_rule_by_hand():
    from rifle.data.cache import last_batch_dropped

    assert last_batch_dropped(33, 16) and last_batch_dropped(1, 16)
    assert not last_batch_dropped(32, 16) and not last_batch_dropped(34, 16)
    # torch.chunk(3 samples, 2) -> 2 + 1; chunk(5, 4) -> 2 + 2 + 1; chunk(5, 2) -> 3 + 2; chunk(6, 4) -> 2+2+2
    assert last_batch_dropped(35, 16, chunks=2) and last_batch_dropped(37, 16, chunks=4)
    assert not last_batch_dropped(37, 16, chunks=2) and not last_batch_dropped(38, 16, chunks=4)
    assert last_batch_dropped(18, 16, chunks=4)  # 2 samples in 4 micro-batches: 1 + 1


def test_one_image_per_rank_is_refused_clearly(tmp_path):
    c = cfg(tmp_path / "run", batch_size=16)
    data = load_data(c)
    data = dataclasses.replace(data, train=data.train.subset([0]))
    with pytest.raises(ValueError, match="1 training image"):
        run_train(c, data=data, log=lambda s: None)


# ------------------------------------------------------------------------------- checkpoint integrity
def test_a_corrupted_weights_file_is_refused_everywhere_naming_the_file(run, tmp_path, capsys):
    _, head = header(run / WEIGHTS)
    name = max(
        (k for k in head if k != "__metadata__"),
        key=lambda k: head[k]["data_offsets"][1] - head[k]["data_offsets"][0],
    )
    flip_byte(run / WEIGHTS, name)
    for command, code, err in uses_of_the_weights(run, tmp_path, capsys):
        assert code == 2, (command, err)
        assert str(run / WEIGHTS) in err and "checksum" in err and "Traceback" not in err, (command, err)
    with pytest.raises(CheckpointError, match="checksum") as info:
        run_train(cfg(run), resume=True, log=lambda s: None)
    assert str(run / WEIGHTS) in str(info.value)


def test_non_finite_weights_are_refused_naming_the_file_and_the_first_bad_tensor(run, tmp_path, capsys):
    def poison(t):
        t["fc.weight"][0, 0] = float("nan")  # later in the network
        t["blocks.1.bn1.running_var"][3] = float("inf")  # the first bad tensor in the model's order

    resave(run / WEIGHTS, poison)  # the checksum matches: the weights were saved like this
    for command, code, err in uses_of_the_weights(run, tmp_path, capsys):
        assert code == 2, (command, err)
        assert str(run / WEIGHTS) in err and "'blocks.1.bn1.running_var'" in err, (command, err)
        assert "non-finite" in err
    with pytest.raises(CheckpointError, match=r"non-finite.*'blocks\.1\.bn1\.running_var'"):
        run_train(cfg(run), resume=True, log=lambda s: None)


def test_checkpoints_without_a_checksum_still_load(run, tmp_path, capsys):
    """Written before checksums existed: accepted as they are (the finiteness check still applies)."""
    resave(run / WEIGHTS, checksum=False)
    from rifle.train.checkpoint import CHECKSUM_KEY

    assert CHECKSUM_KEY not in read_metadata(run / WEIGHTS)
    code, out, err = cli(["predict", run, png(tmp_path), "--device", "cpu"], capsys)
    assert code == 0, err
    lines = []
    summary = run_train(cfg(run), resume=True, log=lines.append)
    assert summary["complete"] and f"resumed from {run} after epoch 0" in lines


def test_the_checksum_is_stored_and_covers_names_shapes_and_bytes(tmp_path):
    from rifle.train.checkpoint import CHECKSUM_KEY, weights_checksum

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, model, {"epoch": 0}, {})
    stored = json.loads(read_metadata(tmp_path / WEIGHTS)[CHECKSUM_KEY])
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert stored == weights_checksum(sd) and len(stored) == 64
    import hashlib

    h = hashlib.sha256()  # by hand: per tensor in name order, [name, dtype, shape] as JSON, then its bytes
    for k in sorted(sd):
        h.update(json.dumps([k, "float32", list(sd[k].shape)]).encode())
        h.update(sd[k].numpy().tobytes())
    assert stored == h.hexdigest()
    assert weights_checksum({"weight": sd["weight"].T.contiguous(), "bias": sd["bias"]}) != stored
    assert weights_checksum({"w": sd["weight"], "bias": sd["bias"]}) != stored


def test_training_never_saves_non_finite_weights(tmp_path):
    from rifle.models import create_model

    model = create_model("tiny_cnn", 10, pretrained=False)
    save_checkpoint(tmp_path, model, {"epoch": 0}, {})
    before = (tmp_path / WEIGHTS).read_bytes(), (tmp_path / STATE).read_bytes()
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite.*'stem\.0\.weight'.*epoch 0"):
        save_checkpoint(tmp_path, model, {"epoch": 1}, {})
    assert ((tmp_path / WEIGHTS).read_bytes(), (tmp_path / STATE).read_bytes()) == before


# ---------------------------------------------------------------------------------- invalid state.pt
class Custom:
    pass


@pytest.mark.parametrize("kind", ["garbage", "custom-class", "empty", "not-a-dict"])
def test_an_invalid_state_file_gets_a_clear_message_and_exit_2(run, capsys, kind):
    spath = run / STATE
    if kind == "garbage":
        spath.write_bytes(bytes(range(256)) * 4)
    elif kind == "custom-class":
        torch.save({"epoch": 0, "x": Custom()}, spath)
    elif kind == "empty":
        spath.write_bytes(b"")
    else:
        torch.save(torch.zeros(3), spath)
    flags = [
        "--data",
        "digits",
        "--model",
        "tiny_cnn",
        "--method",
        "finetune",
        "--epochs",
        "1",
        "--image-size",
        "16",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--train-fraction",
        "0.2",
        "--threads",
        "1",
        "--out",
        run,
        "--resume",
    ]
    code, out, err = cli(["train", *flags], capsys)
    assert code == 2, err
    assert f"{spath} is not a valid rifle state file" in err
    assert "weights_only" not in err and "add_safe_globals" not in err and "Traceback" not in err
    assert "delete" in err.lower()  # what to do
    if kind == "custom-class":
        assert "test_faults.Custom" in err


def test_a_plain_pickle_state_file_warns_nothing_about_weights_only(run):
    """torch warns about pickle protocol 4 and its "weights_only Unpickler": the user sees only rifle's
    error."""
    import pickle
    import warnings

    from rifle.models import create_model

    with open(run / STATE, "wb") as f:
        pickle.dump({"epoch": 0, "x": Custom()}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as info:
        warnings.simplefilter("always")
        load_checkpoint(run, create_model("tiny_cnn", 10), {})
    assert "is not a valid rifle state file" in str(info.value) and "weights_only" not in str(info.value)
    assert [str(w.message) for w in caught if "weights_only" in str(w.message)] == []
