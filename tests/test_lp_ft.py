"""LP-FT (``--method lp-ft``): a frozen backbone during the probe, then fine-tuning; CLI, grid, resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import killed_at_epoch, metrics, run_cli as run
from rifle.methods.lp_ft import LPFT, default_probe_epochs, phase_factor

FAST = [
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--image-size",
    "16",
    "--batch-size",
    "16",
    "--train-fraction",
    "0.2",
    "--lr",
    "0.05",
    "--quiet",
]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_probe_length_and_schedule_by_hand():
    assert [default_probe_epochs(e) for e in (2, 3, 4, 5, 8, 10, 40)] == [1, 1, 1, 2, 2, 3, 10]
    # restart: a cosine over [0, P), then one over [P, E) (E = 6, P = 2)
    assert [phase_factor(e, 6, 2, "cosine") for e in range(6)] == pytest.approx(
        [1.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    )
    assert [phase_factor(e, 6, 2, "constant") for e in range(6)] == [1.0] * 6
    with pytest.raises(ValueError, match="schedule"):
        LPFT(schedule="cyclic")
    with pytest.raises(ValueError, match="--lp-ft-probe-epochs=0"):
        LPFT(probe_epochs=0)
    with pytest.raises(ValueError, match="--lp-ft-probe-epochs=3 leaves no fine-tuning epoch in --epochs=3"):
        LPFT(probe_epochs=3).resolve_probe(3)
    with pytest.raises(ValueError, match="--epochs >= 2"):
        LPFT().resolve_probe(1)


@pytest.mark.parametrize(
    "extra",
    [
        ["--weight-decay", "0.1"],  # backbone gets no gradient
        ["--reg", "bss", "--weight-decay", "0.1"],
    ],
)  # BSS reaches it: lr 0
def test_probe_freezes_backbone_and_batchnorm_then_finetunes(tmp_path, capsys, monkeypatch, extra):
    from rifle.train.trainer import Trainer

    snaps, states = [], []
    original_epoch, original_start = Trainer.train_epoch, LPFT.on_epoch_start

    def train_epoch(self, epoch):
        if epoch == 0:
            snaps.append({k: v.clone() for k, v in self.pretrained_state.items()})
        row = original_epoch(self, epoch)
        snaps.append({k: v.clone() for k, v in self.model.state_dict().items()})
        states.append(
            {
                "backbone": sum(
                    1
                    for p in self.optimizer.state
                    if p is not self.model.fc.weight and p is not self.model.fc.bias
                )
            }
        )
        return row

    def on_epoch_start(self, epoch):
        out = original_start(self, epoch)
        states.append({"after_start": len(self._optimizer.state)})
        return out

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(LPFT, "on_epoch_start", on_epoch_start)
    code, _, err = run(
        [
            "train",
            "--out",
            str(tmp_path / "r"),
            "--method",
            "lp-ft",
            "--lp-ft-probe-epochs",
            "2",
            "--epochs",
            "3",
            *FAST,
            *extra,
        ],
        capsys,
    )
    assert code == 0, err
    pre, after = snaps[0], snaps[1:]
    backbone = [k for k in pre if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone) and any("num_batches_tracked" in k for k in backbone)
    for e in (0, 1):  # the probe: every backbone parameter and BN buffer bit-identical, the head moves
        for k in backbone:
            assert torch.equal(after[e][k], pre[k]), (e, k)
        assert not torch.equal(after[e]["fc.weight"], pre["fc.weight"])
    assert not torch.equal(after[1]["fc.weight"], after[0]["fc.weight"])
    # fine-tuning: the backbone's weights and BN statistics move
    assert any(not torch.equal(after[2][k], pre[k]) for k in backbone if k.endswith("weight"))
    assert any(not torch.equal(after[2][k], pre[k]) for k in backbone if "running_mean" in k)
    rows = metrics(tmp_path / "r")
    assert [r["lp_ft_phase"] for r in rows] == ["probe", "probe", "finetune"]
    # the fine-tuning phase starts from a clean optimizer state (head and backbone)
    starts = [s["after_start"] for s in states if "after_start" in s]
    ends = [s["backbone"] for s in states if "backbone" in s]
    assert starts[2] == 0 and starts[1] > 0
    if "bss" in extra:
        assert ends[0] > 0  # BSS's gradient reached the backbone (momentum), yet lr 0 kept it fixed
    else:
        assert ends[0] == 0  # the probe's head input is detached: no backbone gradient, no state


@pytest.mark.parametrize("opt", ["adan", "lamb"])
def test_finetuning_starts_from_a_fresh_optimizer_step_counts_included(opt):
    """timm's Adan/Lamb count steps per group (bias correction): the first fine-tuning step after a
    3-step probe must equal a fresh optimizer's first step exactly, backbone and head alike."""
    import copy

    from torch import nn

    from rifle.methods.base import RunContext
    from rifle.train.optim import build_optimizer

    def groups(model):
        return [
            {"name": "backbone", "params": list(model[0].parameters())},
            {"name": "head", "params": list(model[2].parameters())},
        ]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = build_optimizer(groups(model), opt=opt, lr=0.01, momentum=0.9, weight_decay=0.01)
    method = LPFT(probe_epochs=1)
    method.setup(
        model,
        optimizer,
        RunContext(
            epochs=2,
            steps_per_epoch=3,
            seed=0,
            num_classes=3,
            head=[model[2]],
            head_names=["2"],
            log=lambda s: None,
        ),
    )
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def step(m, opt_):
        opt_.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt_.step()

    method.on_epoch_start(0)
    for _ in range(3):
        method.on_step_start(0)
        step(model, optimizer)
    assert [int(g["step"]) for g in optimizer.param_groups] == [3, 3]  # the probe counted them
    method.on_epoch_start(1)
    for g in optimizer.param_groups:  # the trainer's LambdaLR restores the LR at the epoch
        g["lr"] = 0.01
    assert not any("step" in g for g in optimizer.param_groups) and not optimizer.state
    fresh_model = copy.deepcopy(model)
    fresh = build_optimizer(groups(fresh_model), opt=opt, lr=0.01, momentum=0.9, weight_decay=0.01)
    before = copy.deepcopy(model.state_dict())
    step(model, optimizer)
    step(fresh_model, fresh)
    assert [int(g["step"]) for g in optimizer.param_groups] == [1, 1]
    for k, v in model.state_dict().items():
        assert not torch.equal(v, before[k]), k  # every parameter moved ...
        assert torch.equal(v, fresh_model.state_dict()[k]), k  # ... exactly as under a fresh optimizer


def test_cli_records_method_options_lr_and_errors(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run(
        [
            "train",
            "--out",
            str(out),
            "--method",
            "lp-ft",
            "--lp-ft-probe-epochs",
            "1",
            "--epochs",
            "3",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert summary["method"] == "lp-ft" and summary["complete"]
    assert summary["methods"]["lp-ft"] == {"probe_epochs": 1, "schedule": "restart"}
    assert config["method"] == "lp-ft" and config["options"] == {"lp-ft": {"probe_epochs": 1}}
    rows = metrics(out)
    # probe: backbone LR 0, head at the base LR; fine-tuning: the cosine restarts over epochs 1-2
    assert rows[0]["lr"] == 0.0 and rows[0]["lr_groups"] == {"backbone": 0.0, "head": 0.05}
    assert [r["lr"] for r in rows[1:]] == pytest.approx([0.05, 0.025])
    assert "lr_groups" not in rows[1]

    # default probe ceil(E/4) = 2 of 5 epochs; the global schedule continues through the boundary
    out2 = tmp_path / "g"
    code, _, err = run(
        [
            "train",
            "--out",
            str(out2),
            "--method",
            "lp-ft",
            "--lp-ft-schedule",
            "global",
            "--epochs",
            "5",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((out2 / "summary.json").read_text())["methods"]["lp-ft"]["probe_epochs"] == 2
    rows = metrics(out2)
    assert [r["lp_ft_phase"] for r in rows] == ["probe"] * 2 + ["finetune"] * 3
    assert [r["lr_groups"]["head"] for r in rows[:2]] == pytest.approx(
        [0.05 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(2)]
    )
    assert rows[2]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))

    code, _, err = run(
        [
            "train",
            "--out",
            str(tmp_path / "bad"),
            "--method",
            "lp-ft",
            "--lp-ft-probe-epochs",
            "3",
            "--epochs",
            "3",
            *FAST,
        ],
        capsys,
    )
    assert code == 2 and "--lp-ft-probe-epochs=3" in err and "--epochs=3" in err, err
    code, _, err = run(["train", "--out", str(tmp_path / "bad2"), "--lp-ft-probe-epochs", "1", *FAST], capsys)
    assert code == 2 and "lp-ft" in err and "--method lp-ft" in err, err


def test_composes_with_l2sp(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run(
        [
            "train",
            "--out",
            str(out),
            "--method",
            "lp-ft",
            "--lp-ft-probe-epochs",
            "1",
            "--reg",
            "l2sp",
            "--epochs",
            "3",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    rows = metrics(out)
    # the backbone does not move in the probe: its distance to the pretrained weights is exactly 0
    assert rows[0]["loss_l2sp"] == 0.0 and rows[0]["loss_l2sp_head"] > 0
    assert rows[2]["loss_l2sp"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"lp-ft", "l2sp"}


def test_grid_entry_runs_through_bench_and_report(tmp_path, capsys):
    grid = {
        "datasets": ["digits"],
        "models": ["tiny_cnn"],
        "methods": [
            {"name": "finetune"},
            {"name": "lp-ft", "options": {"lp-ft": {"probe_epochs": 2}}, "label": "lp-ft"},
        ],
        "seeds": [0],
        "train_fractions": [0.2],
        "train": {"epochs": 3, "image_size": 16, "batch_size": 16, "lr": 0.05, "min_steps_after": 0},
    }
    grid_file, out = tmp_path / "grid.yaml", tmp_path / "out"
    grid_file.write_text(yaml.safe_dump(grid))
    code, _, err = run(["bench", str(grid_file), "--out", str(out)], capsys)
    assert code == 0, err
    run_dir = out / "digits/tiny_cnn/frac0.2/lp-ft/seed0"
    rows = metrics(run_dir)
    assert [r["lp_ft_phase"] for r in rows] == ["probe", "probe", "finetune"]  # the grid's option applied
    assert json.loads((run_dir / "summary.json").read_text())["methods"]["lp-ft"]["probe_epochs"] == 2
    code, out_text, err = run(["report", str(out), "--no-plots"], capsys)
    assert code == 0, err
    md = (out / "results.md").read_text()
    assert "lp-ft" in md and "finetune" in md


def test_resume_across_the_probe_boundary_is_exact(tmp_path, capsys):
    settings = [
        "--method",
        "lp-ft",
        "--lp-ft-probe-epochs",
        "2",
        "--epochs",
        "4",
        "--weight-decay",
        "0.01",
        "--seed",
        "2",
        *FAST,
    ]
    full = tmp_path / "full"
    assert run(["train", "--out", str(full), *settings], capsys)[0] == 0
    expected = metrics(full)
    assert [r["lp_ft_phase"] for r in expected] == ["probe", "probe", "finetune", "finetune"]
    # killed inside the probe (after epoch 0), right after it (after epoch 1), and after the first
    # fine-tuning epoch (the optimizer state then holds the fine-tuning momentum)
    for kill in (1, 2, 3):
        split = tmp_path / f"split{kill}"
        killed_at_epoch(["train", "--out", str(split), *settings], kill, tmp_path)
        assert len(metrics(split)) == kill
        code, _, err = run(["train", "--out", str(split), "--resume"], capsys)
        assert code == 0, err
        assert metrics(split) == expected, kill
        assert (
            json.loads((split / "summary.json").read_text())["final_test_acc"]
            == json.loads((full / "summary.json").read_text())["final_test_acc"]
        )
    # a changed option on --resume is refused, naming it
    code, _, err = run(
        ["train", "--out", str(tmp_path / "split3"), "--resume", "--lp-ft-probe-epochs", "1"], capsys
    )
    assert code == 2 and "options.lp-ft.probe_epochs: 2 -> 1" in err, err


def test_ddp_two_ranks_freeze_by_lr_zero(tmp_path):
    """Under DDP the head input is not detached (DDP expects every gradient): LR 0 alone freezes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port",
            str(port),
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
            "3",
            "--method",
            "lp-ft",
            "--lp-ft-probe-epochs",
            "2",
            "--reg",
            "l2sp",
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
    rows = metrics(out)
    assert [r["lp_ft_phase"] for r in rows] == ["probe", "probe", "finetune"]
    assert rows[0]["loss_l2sp"] == 0.0 and rows[1]["loss_l2sp"] == 0.0 and rows[2]["loss_l2sp"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ddp"]["replica_checksums"][0] == summary["ddp"]["replica_checksums"][1]
