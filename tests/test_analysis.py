"""Backprop-in-depth analysis (weight change, DepthMonitor) and Grad-CAM against hand computations."""

import json
import math
import shutil

import pytest
import torch
from torch import nn

from conftest import metrics
from rifle.analysis.cam import cam_for_runs, grad_cam, grad_cam_maps, pick_images
from rifle.analysis.depth import layer_profile, read_monitor, relative_change, tracked_layers
from rifle.analysis.monitor import DepthMonitor, monitor_epochs
from rifle.analysis.runs import load_profile, run_depth
from rifle.config import TrainConfig
from rifle.methods.base import RunContext
from rifle.models import create_model


def cfg(tmp_path, name, **kw):
    base = dict(
        data="digits",
        model="tiny_cnn",
        method="rifle",
        reinits=1,
        epochs=3,
        image_size=16,
        batch_size=32,
        lr=0.05,
        min_steps_after=0,
        train_fraction=0.3,
        out=str(tmp_path / name),
    )
    base.update(kw)
    return TrainConfig(**base).validate()


def test_relative_change_and_layers_by_hand():
    ref = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    cur = {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    assert layer_profile(cur, ref, ["a", "b"]) == [pytest.approx(0.2), 0.0]  # |(0,1)| / |(3,4)| = 1/5
    assert relative_change(torch.ones(2), torch.zeros(2)) == math.inf
    with pytest.raises(KeyError, match="c"):
        layer_profile(cur, ref, ["c"])
    names = [n for n, _ in tracked_layers(create_model("tiny_cnn", 3))]
    assert names[0] == "stem.0.weight" and names[-1] == "fc.weight" and len(names) == 10
    assert monitor_epochs({"reinits": 2}, 12) == [4, 8] and monitor_epochs({"reinits": 0}, 12) == []


def test_monitor_reads_each_steps_gradient_after_backward():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = DepthMonitor("unused", window=1, epochs=[1])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        mon.path = __import__("pathlib").Path(d) / "depth.jsonl"
        ctx = RunContext(
            epochs=2,
            steps_per_epoch=3,
            seed=0,
            num_classes=2,
            head=[model[4]],
            head_names=["4"],
            pretrained_state={k: v.clone() for k, v in model.state_dict().items()},
        )
        mon.setup(model, opt, ctx)
        expected = {}
        for epoch in range(2):  # the trainer's order: on_step_start, forward, zero_grad, backward, step
            mon.on_epoch_start(epoch)
            model.train()
            for i in range(3):
                step = epoch * 3 + i
                mon.on_step_start(step)
                x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 0, 1])
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                expected[step] = [float(model[0].weight.grad.norm()), float(model[4].weight.grad.norm())]
                opt.step()
            model.eval()
            with torch.no_grad():
                model(torch.randn(2, 3, 6, 6))  # evaluation: the epoch-end weight record
                model(torch.randn(2, 3, 6, 6))
        mon.close()
        rec = read_monitor(d)
    assert rec["header"]["names"] == ["0.weight", "4.weight"] and rec["header"]["head"] == [False, True]
    assert [(g["step"], g["offset"]) for g in rec["grad"]] == [(2, -1), (3, 0)]  # window 1 around epoch 1
    for g in rec["grad"]:
        assert g["norms"] == pytest.approx(expected[g["step"]], rel=1e-6)
    assert [w["epoch"] for w in rec["weights"]] == [0, 1]
    w0 = ctx.pretrained_state["4.weight"]
    assert rec["weights"][-1]["rel_change"][1] == pytest.approx(
        float((model[4].weight.detach() - w0).norm() / w0.norm())
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A RIFLE run with the DepthMonitor wired in as run.py will do, and the same run without it."""
    import rifle.run as run_mod
    from rifle.run import run_train
    from rifle.train import Trainer

    tmp = tmp_path_factory.mktemp("depth")
    plain = run_train(cfg(tmp, "plain"), log=lambda s: None)
    mp = pytest.MonkeyPatch()
    mp.setattr(
        run_mod,
        "Trainer",
        lambda model, data, methods, **kw: Trainer(
            model, data, [*methods, DepthMonitor(kw["run_dir"].path, window=2)], **kw
        ),
    )
    monitored = run_train(cfg(tmp, "monitored"), log=lambda s: None)
    mp.undo()
    return tmp, plain, monitored


def test_monitor_changes_nothing_and_records_around_the_reinit(runs):
    tmp, plain, monitored = runs
    assert metrics(tmp / "plain") == metrics(tmp / "monitored")
    rec = read_monitor(tmp / "monitored")
    spe = rec["header"]["steps_per_epoch"]
    assert rec["header"]["watch_epochs"] == plain["reinit_epochs"] == [1]
    assert [w["epoch"] for w in rec["weights"]] == [0, 1, 2]
    assert [(g["step"], g["offset"]) for g in rec["grad"]] == [
        (spe - 2, -2),
        (spe - 1, -1),
        (spe, 0),
        (spe + 1, 1),
    ]
    assert all(v > 0 for g in rec["grad"] for v in g["norms"])
    assert [g["epoch"] for g in rec["grad"]] == [0, 0, 1, 1] and rec["header"]["head"][-1] is True
    # the monitor's last epoch equals the checkpoint analysis (same reference: pretrained + first head)
    depth = run_depth(tmp / "monitored")
    assert rec["weights"][-1]["rel_change"] == pytest.approx(
        [x["rel_change"] for x in depth["layers"]], rel=1e-6
    )


def test_weight_change_zero_untrained_positive_after_training(runs, tmp_path):
    from safetensors.torch import save_file

    from rifle.analysis.runs import build_reference, _read_config
    from rifle.train.checkpoint import CHECKSUM_KEY, WEIGHTS, read_metadata

    src = runs[0] / "plain"
    res = run_depth(src)
    assert res["epoch"] == 2 and [x["head"] for x in res["layers"]] == [False] * 9 + [True]
    assert all(x["rel_change"] > 0 for x in res["layers"])
    assert load_profile(src) == [x["rel_change"] for x in res["layers"]]  # depth.json written
    # an untrained copy: the checkpoint replaced by the model as run_train built it before training
    copy = tmp_path / "untrained"
    shutil.copytree(src, copy)
    (copy / "depth.json").unlink()
    ref = build_reference(_read_config(copy), 10)
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()},
        str(copy / WEIGHTS),
        metadata={k: v for k, v in read_metadata(src / WEIGHTS).items() if k != CHECKSUM_KEY},
    )
    assert all(x["rel_change"] == 0.0 for x in run_depth(copy)["layers"])


def test_grad_cam_matches_hand_formula_and_writes_png(runs, tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 4).eval()
    x = torch.randn(3, 3, 16, 16)
    cam, logits, target = grad_cam_maps(model, x)
    with torch.no_grad():
        a = model.forward_features(x)  # [B, C, h, w]; score_k = fc(mean_hw A): dS/dA_c = w_kc / (h w)
        w = model.fc.weight[target]  # [B, C]
        hand = torch.relu((w[:, :, None, None] * a).sum(1) / (a.shape[2] * a.shape[3]))
    assert torch.equal(target, logits.argmax(1)) and cam.shape == a.shape[:1] + a.shape[2:]
    assert torch.allclose(cam, hand, atol=1e-6)
    up, _, _ = grad_cam(model, x, target=torch.tensor([0, 1, 2]))
    assert up.shape == (3, 16, 16) and float(up.min()) >= 0 and float(up.max()) <= 1
    assert all(float(m.max()) in (0.0, 1.0) for m in up)
    named, _, _ = grad_cam_maps(model, x, layer="blocks")  # a named module's output: same map here
    assert torch.allclose(named, cam, atol=1e-6)
    assert pick_images(torch.tensor([0, 0, 1, 2, 1, 2]), 4) == [0, 2, 3, 1]
    out = tmp_path / "cam.png"
    res = cam_for_runs([runs[0] / "plain", runs[0] / "monitored"], out, n_images=5)
    assert out.is_file() and 0 < out.stat().st_size < 300_000 and len(res["indices"]) == 5


def test_cli_analyze_writes_depth_files(runs, tmp_path, capsys):
    from rifle.cli import main

    tmp = runs[0]
    code = main(["analyze", str(tmp / "plain"), str(tmp / "monitored"), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "cmp" / "depth_compare.png").is_file() and (tmp / "plain" / "depth.png").is_file()
    assert (tmp / "monitored" / "depth_monitor.png").is_file() and "depth_monitor.png" in out
    assert (tmp_path / "cmp" / "gradients_compare.png").is_file()
    (tmp / "monitored" / "depth_monitor.png").unlink()
    # --no-depth: no checkpoint needed; the depth.jsonl plots are still drawn
    assert (
        main(
            [
                "analyze",
                str(tmp / "plain"),
                str(tmp / "monitored"),
                "--no-depth",
                "--out",
                str(tmp_path / "cmp2"),
            ]
        )
        == 0
    )
    assert (tmp / "monitored" / "depth_monitor.png").is_file()
    assert (tmp_path / "cmp2" / "gradients_compare.png").is_file()
    # ... and the weight-change profile comes from depth.jsonl: the same numbers as from the checkpoint
    from_ckpt = json.loads((tmp_path / "cmp" / "depth_compare.json").read_text())
    from_monitor = json.loads((tmp_path / "cmp2" / "depth_compare.json").read_text())
    (ckpt,) = [r for r in from_ckpt if r["run"].endswith("monitored")]
    (mon,) = from_monitor
    assert [x["name"] for x in mon["layers"]] == [x["name"] for x in ckpt["layers"]]
    assert [x["head"] for x in mon["layers"]] == [x["head"] for x in ckpt["layers"]]
    assert [x["rel_change"] for x in mon["layers"]] == pytest.approx(
        [x["rel_change"] for x in ckpt["layers"]], rel=1e-5, abs=1e-9
    )
    assert main(["analyze", str(tmp_path)]) == 2  # not a run folder: a clear error, no traceback
