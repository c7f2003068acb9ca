"""--log-to: metrics.csv and TensorBoard events (read back with tensorboard's own EventAccumulator) equal
metrics.jsonl; --log-interval: step lines when stderr is not a terminal."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import SRC, interrupted_at_epoch, rifle_cfg, run_cli
from rifle.run import run_train
from rifle.train.loggers import flatten

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAIN = [
    "train",
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--method",
    "rifle",
    "--reinits",
    "1",
    "--epochs",
    "4",
    "--image-size",
    "16",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--min-steps-after",
    "0",
    "--train-fraction",
    "0.4",
    "--diagnosis-window",
    "2",
]
# one epoch of plain fine-tuning (rifle --reinits 0 is refused: it is fine-tuning)
FINETUNE = [
    "train",
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--epochs",
    "1",
    "--image-size",
    "16",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--train-fraction",
    "0.4",
]


def jsonl(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def events(run):
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    texts = {
        t.removesuffix("/text_summary"): [
            (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)
        ]
        for t in acc.Tags()["tensors"]
    }
    return scalars, texts


def series(rows, key):
    return [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows if r.get(key) is not None]


def check_events_equal_jsonl(run):
    rows = jsonl(run)
    sc, texts = events(run)
    for tag, key in [
        ("accuracy/train", "train_acc"),
        ("accuracy/val", "val_acc"),
        ("accuracy/test", "test_acc"),
        ("loss/train", "train_loss"),
        ("loss/val", "val_loss"),
        ("loss/test", "test_loss"),
        ("lr", "lr"),
        ("time/images_per_s", "images_per_s"),
    ]:
        assert sc[tag] == series(rows, key), tag  # each epoch once, in order, with the jsonl value
    assert sc["rifle/reinit"] == [(r["epoch"], float(r["reinit"])) for r in rows]
    assert [e for e, v in sc["rifle/reinit"] if v == 1.0] == [2]  # K=1 over 4 epochs: epoch 2
    diag = [r["rifle_diagnosis"] for r in rows if "rifle_diagnosis" in r]
    assert len(diag) == 1 and diag[0]["index"] == 1
    d = diag[0]
    for field in ("grad_ratio", "train_loss_before", "train_acc_before"):
        assert sc[f"rifle_diagnosis/{field}"] == [(1, pytest.approx(d[field], rel=1e-6))]
    assert texts["rifle_diagnosis/verdict"] == [(1, d["verdict"])]
    assert [sc[f"rifle_diagnosis/grad_ratio_thirds/{t}"] for t in ("first", "middle", "last")] == [
        [(1, pytest.approx(v, rel=1e-6))] for v in d["grad_ratio_thirds"]
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert sc["summary/final_test_acc"] == [(3, pytest.approx(summary["final_test_acc"], rel=1e-6))]
    assert sc["summary/test_acc_at_best_val"] == [
        (3, pytest.approx(summary["test_acc_at_best_val"], rel=1e-6))
    ]
    assert '"final_test_acc"' in texts["summary"][0][1]
    return rows


def check_csv_equals_jsonl(run):
    rows = [flatten(r) for r in jsonl(run)]
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert set(table[0]) == {k for r in rows for k in r}  # one column per (flattened) field
    for got, want in zip(table, rows):
        for k, cell in got.items():
            v = want.get(k)
            if v is None:
                assert cell == "", k
            elif isinstance(v, bool):
                assert cell == str(v), k
            elif isinstance(v, (list, dict)):
                assert json.loads(cell) == v, k
            elif isinstance(v, (int, float)):
                assert float(cell) == v, k  # exact: written at full precision
            else:
                assert cell == v, k
    assert any("rifle_diagnosis.grad_ratio" in r for r in rows)  # the diagnosis is flattened into columns


def test_train_writes_csv_and_tensorboard_equal_to_jsonl(tmp_path, capsys):
    run = tmp_path / "r"
    code, out, err = run_cli([*TRAIN, "--out", run, "--log-to", "csv,tensorboard"], capsys)
    assert code == 0, err
    rows = check_events_equal_jsonl(run)
    assert "val_loss" in rows[0] and "test_loss" in rows[0]
    check_csv_equals_jsonl(run)
    # rifle report on the folder of runs points TensorBoard at it
    code, out, err = run_cli(["report", tmp_path, "--no-plots"], capsys)
    assert code == 0, err
    assert f"tensorboard --logdir {tmp_path}" in out
    assert f"`tensorboard --logdir {tmp_path}`" in (tmp_path / "results.md").read_text()


def test_default_log_writes_both_and_resume_shows_each_epoch_once(tmp_path):
    # interrupted after 2 epochs (events of epochs 0-1 on disk), resumed: TensorBoard sees 0..3 once each
    cfg = rifle_cfg(tmp_path, diagnosis_window=2)
    assert cfg.log_to == "auto"
    with interrupted_at_epoch(2), pytest.raises(KeyboardInterrupt):
        run_train(cfg, log=lambda s: None)
    run = tmp_path / "run"
    assert [e for e, _ in events(run)[0]["accuracy/val"]] == [0, 1]
    run_train(cfg, resume=True, log=lambda s: None)
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # one file per process
    check_events_equal_jsonl(run)
    check_csv_equals_jsonl(run)


def test_log_jsonl_only_and_bad_log_value(tmp_path, capsys):
    run = tmp_path / "r"
    code, _, err = run_cli([*FINETUNE, "--out", run, "--log-to", "jsonl"], capsys)
    assert code == 0, err
    assert (
        (run / "metrics.jsonl").is_file() and not (run / "metrics.csv").exists() and not (run / "tb").exists()
    )
    code, _, err = run_cli([*TRAIN, "--out", tmp_path / "b", "--log-to", "csv,wandb"], capsys)
    assert code == 2 and "--log-to csv,wandb" in err and "'wandb'" in err and "Traceback" not in err
    code, _, err = run_cli([*TRAIN, "--out", tmp_path / "b", "--log-interval", "-3"], capsys)
    assert code == 2 and "--log-interval" in err


def test_no_train_flag_is_taken_by_torchrun():
    # `torchrun ... -m rifle train FLAGS`: torchrun's argparse reads every --option, also the script's, and
    # takes an abbreviation of its own (--log for --log-dir: an "ambiguous option" error). Hence --log-to.
    import argparse

    from rifle.commands import train
    from torch.distributed.run import get_args_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    ours = [o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert "--log-to" in ours and "--log-interval" in ours
    assert not {o: t for o in ours for t in theirs if t.startswith(o)}


def test_help_shows_log_flags(capsys):
    with pytest.raises(SystemExit):
        run_cli(["train", "--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())
    assert "--log-to LOG_TO" in text and "(default auto: csv,tensorboard when installed)" in text
    assert "--log-interval LOG_INTERVAL" in text and "(default 50)" in text


LINE = re.compile(
    r"^epoch (\d+) of (\d+)  step (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\S+)  (\d+\.\d) img/s  "
    r"ETA (\d+:\d\d:\d\d) epoch, (\d+:\d\d:\d\d) training$"
)


# `rifle` in a child process that also writes every training batch's loss (the mean cross-entropy
# the trainer backpropagates) and size to the file argv[1], read by torch's own function, not rifle's
RECORD_LOSSES = (
    "import json, sys, torch\n"
    "import torch.nn.functional as F\n"
    "original, record = F.cross_entropy, open(sys.argv[1], 'a')\n"
    "def cross_entropy(input, target, *args, **kwargs):\n"
    "    loss = original(input, target, *args, **kwargs)\n"
    "    if input.requires_grad and kwargs.get('reduction', 'mean') == 'mean':\n"
    "        record.write(json.dumps([float(loss), len(target)]) + '\\n'); record.flush()\n"
    "    return loss\n"
    "F.cross_entropy = cross_entropy\n"
    "from rifle.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def weighted_mean(batches: list[list[float]]) -> float:
    """The image-weighted mean of ``[loss, images]`` pairs."""
    return sum(loss * n for loss, n in batches) / sum(n for _, n in batches)


def test_step_lines_when_stderr_is_a_pipe(tmp_path):
    # a real child process whose stderr is a pipe, as in a batch job: no bars, a line every 2 steps
    run = tmp_path / "r"
    argv = [
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
        "32",
        "--train-fraction",
        "0.4",
        "--log-interval",
        "2",
        "--log-to",
        "jsonl",
        "--out",
        str(run),
    ]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    losses = tmp_path / "losses.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", RECORD_LOSSES, str(losses), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr  # no tqdm bar
    steps = int(re.search(r"2 epochs x (\d+) steps", proc.stdout).group(1))
    lines = [LINE.match(x) for x in proc.stderr.splitlines() if x.startswith("epoch ")]
    assert lines and all(lines), proc.stderr
    rows = jsonl(run)
    got = [(int(m[1]), int(m[3])) for m in lines]
    # every 2nd step of each epoch; none at the last step (the epoch's own line follows)
    assert got == [(e, s) for e in (0, 1) for s in range(2, steps, 2)]
    for m in lines:
        epoch = int(m[1])
        assert int(m[2]) == 2 and int(m[4]) == steps
        assert float(m[6]) == pytest.approx(rows[epoch]["lr"], rel=1e-4)
        assert float(m[7]) > 0
    # the loss shown is the epoch's image-weighted mean of the batch losses so far, to 4 decimals
    batches = [json.loads(x) for x in losses.read_text().splitlines()]
    assert len(batches) == 2 * steps
    for m in lines:
        epoch, done = int(m[1]), int(m[3])
        seen = batches[epoch * steps : epoch * steps + done]
        assert float(m[5]) == pytest.approx(weighted_mean(seen), abs=5.1e-5)
    for epoch in (0, 1):  # and metrics.jsonl's train_loss is that mean over the whole epoch
        seen = batches[epoch * steps : (epoch + 1) * steps]
        assert rows[epoch]["train_loss"] == pytest.approx(weighted_mean(seen), rel=1e-9)


def test_log_interval_zero_prints_no_step_lines(tmp_path, capsys):
    code, _, err = run_cli(
        [*FINETUNE, "--log-interval", "0", "--log-to", "jsonl", "--out", tmp_path / "r"], capsys
    )
    assert code == 0, err
    assert not [x for x in err.splitlines() if LINE.match(x)]
    code, out, err = run_cli(
        [*FINETUNE, "--log-interval", "3", "--log-to", "jsonl", "--out", tmp_path / "s"], capsys
    )
    assert code == 0, err
    steps = int(re.search(r"1 epochs x (\d+) steps", out).group(1))
    assert steps > 3
    assert [int(LINE.match(x)[3]) for x in err.splitlines() if LINE.match(x)] == list(range(3, steps, 3))


def test_step_lines_every_30_seconds_and_eta(monkeypatch):
    from rifle.train import loggers

    clock = iter([0.0, 10.0, 29.0, 40.0, 50.0])
    monkeypatch.setattr(loggers.time, "perf_counter", lambda: next(clock))
    out = []
    s = loggers.StepLines(interval=0, epochs=3, steps_per_epoch=100, write=out.append, world_size=2)
    s.start(1)  # t=0
    s.step(0, 32, torch_tensor(32 * 2.0), 0.01)  # t=10: nothing (interval 0, < 30 s)
    s.step(1, 64, torch_tensor(64 * 1.5), 0.01)  # t=29: nothing
    s.step(2, 96, torch_tensor(96 * 1.25), 0.01)  # t=40: a line (>= 30 s since the start)
    s.step(3, 128, torch_tensor(128.0), 0.01)  # t=50: nothing (10 s since the last line)
    # t=40 after 3 steps: 13.33 s/step; epoch: 97 steps left = 1293 s; training: + 100 steps of epoch 2
    assert out == [
        "epoch 1 of 3  step 3/100  loss 1.2500  lr 0.01  4.8 img/s  ETA 0:21:33 epoch, 0:43:47 training"
    ]


def torch_tensor(x):
    import torch

    return torch.tensor(x, dtype=torch.float64)
