"""RIFLE's options end to end through ``rifle train`` (digits, tiny_cnn, a few epochs of 3 steps).

Spies wrap the real ``Rifle`` / optimizer methods (the real code still runs) to observe what happens
at the exact step a re-init or an LR change is due.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from conftest import interrupted_at_epoch
from rifle.cli import main
from rifle.core.reinit import cosine_factor
from rifle.core.rifle import Rifle
from rifle.models.builtin import BasicBlock

# digits at 16 px, 15 % of train: 182 images = 3 steps of 64 (64, 64, 54) per epoch
STEPS_PER_EPOCH = 3
FAST = [
    "train",
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--image-size",
    "16",
    "--batch-size",
    "64",
    "--train-fraction",
    "0.15",
    "--lr",
    "0.05",
    "--quiet",
]
VOLATILE = {"seconds", "images_per_s"}


def train(capsys, *argv) -> int:
    code = main([*FAST, *argv])
    _, err = capsys.readouterr()
    assert code in (0, 130), err
    return code


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stable(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows(out)]


def summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from rifle.train.checkpoint import WEIGHTS

    return load_file(str(out / WEIGHTS))


def module_state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def torch_reset(modules: list[torch.nn.Module], seed: int, index: int) -> list[dict[str, torch.Tensor]]:
    """What re-init ``index`` must write, drawn without rifle's code (docs/rifle.md#initialisers: the
    ``default`` values are bit-identical to this): the documented seed, sha256 of "seed:reinit:index"
    (first 8 bytes, little-endian, >> 1), given to ``torch.manual_seed``, then every submodule's own
    ``reset_parameters()`` in module order, on fresh modules of the same shapes."""
    s = int.from_bytes(hashlib.sha256(f"{seed}:reinit:{index}".encode()).digest()[:8], "little") >> 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        for m in modules:
            for sub in m.modules():
                if hasattr(sub, "reset_parameters") and list(sub.parameters(recurse=False)):
                    sub.reset_parameters()
    return [module_state(m) for m in modules]


def fresh_linear(like: torch.nn.Linear) -> torch.nn.Linear:
    return torch.nn.utils.skip_init(torch.nn.Linear, like.in_features, like.out_features)


# -------------------------------------------------------------------------- --reinit-granularity step
def test_step_granularity_reinits_the_head_at_the_scheduled_optimizer_steps(tmp_path, capsys, monkeypatch):
    seen: list[tuple[int, bool, torch.Tensor, torch.Tensor]] = []
    expected: dict[int, list[torch.Tensor]] = {}
    original = Rifle.on_step_start

    def spy(self, step):
        head = self.head_modules[0]
        before = head.weight.detach().clone()
        for idx, point in enumerate(self.points, start=1):
            if point == step:  # what re-init number idx must write (a pure function of seed, idx)
                assert self.seed == 0 and self.init == "default"
                expected[step] = torch_reset([fresh_linear(head)], 0, idx)[0]["weight"]
        fired = original(self, step)
        seen.append((step, fired, before, head.weight.detach().clone()))
        return fired

    monkeypatch.setattr(Rifle, "on_step_start", spy)
    out = tmp_path / "step"
    train(
        capsys,
        "--epochs",
        "4",
        "--method",
        "rifle",
        "--reinits",
        "2",
        "--reinit-granularity",
        "step",
        "--out",
        str(out),
    )
    total = 4 * STEPS_PER_EPOCH  # 12 steps, K = 2: re-init at floor(i * 12 / 3) = steps 4 and 8
    assert [s for s, *_ in seen] == list(range(total))
    fired = [s for s, f, _, _ in seen if f]
    assert fired == [4, 8]
    for step, f, before, after in seen:
        if f:  # the head holds exactly the freshly drawn values, not the trained ones
            assert torch.equal(after, expected[step]), step
            assert not torch.equal(before, after)
        else:  # nothing touches the head at any other step start
            assert torch.equal(before, after), step
    # step 4 is the 2nd step of epoch 1, step 8 the 3rd of epoch 2: metrics and summary say so
    assert [r["reinit"] for r in rows(out)] == [False, True, True, False]
    s = summary(out)
    assert s["reinit_epochs"] == [1, 2] and s["reinit_epochs_seen"] == [1, 2]
    assert s["methods"]["rifle"]["granularity"] == "step"
    # the head trained after its last re-init: the saved head is not the step-8 draw
    assert not torch.equal(weights(out)["fc.weight"], expected[8])


# -------------------------------------------------------------------------------- --head-lr-restart
@pytest.mark.parametrize("granularity", ["epoch", "step"])
def test_head_lr_restarts_each_period_while_the_backbone_follows_the_global_cosine(
    tmp_path, capsys, monkeypatch, granularity
):
    used: list[dict[str, float]] = []  # the LR of each group at every optimizer step
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        used.append({g["name"]: g["lr"] for g in self.param_groups})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    out = tmp_path / granularity
    epochs, lr = 4, 0.05
    train(
        capsys,
        "--epochs",
        str(epochs),
        "--method",
        "rifle",
        "--reinits",
        "1",
        "--head-lr-restart",
        "--reinit-granularity",
        granularity,
        "--out",
        str(out),
    )
    spe = STEPS_PER_EPOCH
    assert len(used) == epochs * spe
    for step, lrs in enumerate(used):
        epoch = step // spe
        # the trainer's schedule (cosine per epoch) for the backbone
        assert lrs["backbone"] == pytest.approx(
            lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs)), rel=1e-12
        )
        # the head: a cosine restarted at each period start (epochs 0 and 2 = steps 0 and 6)
        t, period = (epoch, 2) if granularity == "epoch" else (step, 2 * spe)
        assert lrs["head"] == pytest.approx(lr * cosine_factor(t % period, period), rel=1e-12), (step, lrs)
    starts = [s for s in range(len(used)) if used[s]["head"] == pytest.approx(lr)]
    assert starts == ([0, 1, 2, 6, 7, 8] if granularity == "epoch" else [0, 6])
    # metrics.jsonl logs what the epoch's first step used, per group
    for r, epoch in zip(rows(out), range(epochs)):
        first = used[epoch * spe]
        assert r["lr"] == pytest.approx(first["backbone"], rel=1e-12)
        logged = r.get("lr_groups", {"backbone": r["lr"], "head": r["lr"]})
        assert logged == pytest.approx(first, rel=1e-12), (epoch, logged, first)
    assert summary(out)["reinit_epochs"] == [2]


# -------------------------------------------------------------------------------- --reinit-modules
def test_reinit_modules_last_block_is_redrawn_with_fresh_batchnorm_statistics(tmp_path, capsys, monkeypatch):
    events: list[dict] = []
    original = Rifle.reinit

    def spy(self, index):
        inner = self.model
        block, other = inner.blocks[2], inner.blocks[1]
        before = {"block": module_state(block), "other": module_state(other), "fc": module_state(inner.fc)}
        with torch.random.fork_rng(devices=[]):  # fresh modules of the same shapes (their init is reset)
            fc, blk = fresh_linear(inner.fc), BasicBlock(24, 48, stride=2)
        assert [p.shape for p in blk.parameters()] == [p.shape for p in block.parameters()]
        drawn = torch_reset([fc, blk], self.seed, index)
        original(self, index)
        events.append(
            {
                "names": list(self.module_names),
                "before": before,
                "drawn": drawn,
                "after": {
                    "block": module_state(block),
                    "other": module_state(other),
                    "fc": module_state(inner.fc),
                },
            }
        )

    monkeypatch.setattr(Rifle, "reinit", spy)
    out = tmp_path / "modules"
    train(
        capsys,
        "--epochs",
        "2",
        "--method",
        "rifle",
        "--reinits",
        "1",
        "--reinit-modules",
        "last:1",
        "--out",
        str(out),
    )
    assert len(events) == 1
    e = events[0]
    assert e["names"] == ["fc", "blocks.2"]
    before, after = e["before"]["block"], e["after"]["block"]
    # the block's weights are the fresh draw (parameters in parameters() order)
    block_params = [
        k
        for k in after
        if not any(k.endswith(b) for b in ("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert len(block_params) == 9  # conv1, bn1 (2), conv2, bn2 (2), downsample conv and bn (2); no conv bias
    for k in block_params:
        assert torch.equal(after[k], e["drawn"][1][k]), k
        if k.endswith("conv1.weight"):
            assert not torch.equal(before[k], after[k])
    # BatchNorm running statistics of the block restart from scratch (they were trained)
    bns = [k[: -len(".running_mean")] for k in after if k.endswith("running_mean")]
    assert sorted(bns) == ["bn1", "bn2", "downsample.1"]
    for bn in bns:
        assert not torch.equal(before[f"{bn}.running_mean"], torch.zeros_like(before[f"{bn}.running_mean"]))
        assert int(before[f"{bn}.num_batches_tracked"]) == STEPS_PER_EPOCH
        assert torch.equal(after[f"{bn}.running_mean"], torch.zeros_like(after[f"{bn}.running_mean"])), bn
        assert torch.equal(after[f"{bn}.running_var"], torch.ones_like(after[f"{bn}.running_var"])), bn
        assert int(after[f"{bn}.num_batches_tracked"]) == 0, bn
    # the head is redrawn too; the block below is untouched
    assert torch.equal(e["after"]["fc"]["weight"], e["drawn"][0]["weight"])
    assert torch.equal(e["after"]["fc"]["bias"], e["drawn"][0]["bias"])
    assert all(torch.equal(e["before"]["other"][k], v) for k, v in e["after"]["other"].items())
    assert [r["reinit"] for r in rows(out)] == [False, True]
    assert summary(out)["methods"]["rifle"]["modules"] == "last:1"


# -------------------------------------------------------------------------------- L2-SP and resume
def test_l2sp_reference_after_resume_is_the_pretrained_model(tmp_path, capsys, monkeypatch):
    args = ["--epochs", "2", "--method", "finetune", "--reg", "l2sp", "--l2sp-alpha", "1.0"]
    full = tmp_path / "full"
    train(capsys, *args, "--out", str(full))

    split = tmp_path / "split"
    with interrupted_at_epoch(1):
        assert train(capsys, *args, "--out", str(split)) == 130
    assert len(rows(split)) == 1
    assert train(capsys, *args, "--out", str(split), "--resume") == 0
    # the term at epoch 1 measures the distance to the pretrained weights, not to the epoch-0 weights
    # it resumed from: every number, and every weight, as in the uninterrupted run
    assert stable(split) == stable(full)
    assert all(r["loss_l2sp"] > 0 for r in rows(full))
    wa, wb = weights(full), weights(split)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -------------------------------------------------------------------------------------- --compile
@pytest.mark.slow  # inductor compiles C++ kernels: ~140 s with a cold cache on 2 busy cores, ~8 s warm
def test_compile_trains_like_eager(tmp_path, capsys):
    args = ["--epochs", "2", "--method", "rifle", "--reinits", "1"]
    train(capsys, *args, "--out", str(tmp_path / "eager"))
    train(capsys, *args, "--compile", "--out", str(tmp_path / "compiled"))
    eager, compiled = rows(tmp_path / "eager"), rows(tmp_path / "compiled")
    assert [r["reinit"] for r in compiled] == [False, True]
    assert summary(tmp_path / "compiled")["reinit_epochs"] == [1]
    for a, b in zip(eager, compiled):  # fused kernels: equal up to float rounding
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=2 / 449)  # at most 2 of 449 test images
    wa, wb = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-3, atol=1e-4) for k in wa)
