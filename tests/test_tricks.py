"""The tricks RIFLE is compared against: known answers, statistical bounds (5 sigma), CLI smoke runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rifle.cli import main
from rifle.core import Rifle
from rifle.core.structure import find_head, head_names, residual_blocks
from rifle.methods import RunContext, create
from rifle.methods.cyclic_lr import cycle_starts, sgdr_factor
from rifle.methods.disturblabel import disturb_labels
from rifle.methods.dropconnect import dropconnect_linear
from rifle.methods.dropout import feature_dropout
from rifle.methods.stochastic_depth import drop_rates
from rifle.models import create_model


def within(measured: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    """|measured - p| within ``sigmas`` binomial standard deviations of n draws."""
    return abs(measured - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def only(t: torch.Tensor, *values: float) -> bool:
    """Every element of ``t`` is (numerically) one of ``values``."""
    return bool(torch.stack([torch.isclose(t, torch.tensor(v)) for v in values]).any(0).all())


def ctx_for(model: nn.Module, epochs: int = 4, config: dict | None = None) -> RunContext:
    head = find_head(model)
    return RunContext(
        epochs=epochs,
        steps_per_epoch=1,
        seed=0,
        num_classes=head[0].out_features,
        head=head,
        head_names=head_names(model, head),
        config=config or {},
        log=lambda s: None,
    )


def tiny(num_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny_cnn", num_classes, pretrained=True)


def setup(name: str, model: nn.Module, **opts):
    m = create(name, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m.setup(model, opt, ctx_for(model))
    return m, opt


# ---------------------------------------------------------------------------------------- dropout
def test_feature_dropout_rate_scale_and_eval_identity():
    x = torch.ones(400, 250)
    torch.manual_seed(1)
    y = feature_dropout(x, 0.3, training=True)
    zero = float((y == 0).float().mean())
    assert within(zero, 0.3, x.numel())
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert torch.equal(feature_dropout(x, 0.3, training=False), x)


def test_dropout_hook_drops_the_head_input_in_train_only():
    model = tiny()
    seen = []
    model.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))  # before: raw
    x = torch.randn(64, 3, 16, 16)
    model.eval()
    ref = model(x)
    trick = create("dropout", p=0.5)
    for _ in range(2):  # a second setup of the same trick never stacks a second dropout
        trick.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx_for(model))
    after = []
    model.fc.register_forward_hook(lambda m, a, o: after.append(a[0].detach().clone()))  # what fc saw
    assert torch.equal(model(x), ref)  # eval: identity
    model.train()
    torch.manual_seed(0)
    model(x)
    raw, dropped = seen[-1], after[-1]
    nz = raw != 0
    assert nz.float().mean() > 0.5  # pooled ReLU features: mostly non-zero
    zero_rate = float((dropped[nz] == 0).float().mean())
    # two stacked dropouts would zero 75 %; one zeroes 50 %
    assert within(zero_rate, 0.5, int(nz.sum()))
    kept = dropped[nz] != 0
    assert torch.allclose(dropped[nz][kept], 2 * raw[nz][kept])


# ------------------------------------------------------------------------------------ dropconnect
@pytest.mark.parametrize("per_sample", [False, True])
def test_dropconnect_masked_fraction_scale_and_gradient(per_sample):
    p, c, d = 0.3, 20, 50
    g = torch.Generator().manual_seed(0)
    zeros, n = 0, 0
    for _ in range(40):
        w = torch.ones(c, d, requires_grad=True)
        x = torch.eye(d)  # row j picks column j of (W * M_j): out[j, c] = M[c, j] / (1 - p)
        out = dropconnect_linear(x, w, None, p, True, g, per_sample=per_sample)
        assert only(out, 0.0, 1 / (1 - p))
        out.sum().backward()
        # d out.sum() / dW[c, j] = M[c, j] / (1 - p): the gradient flows through the mask
        assert torch.allclose(w.grad, out.detach().T)
        zeros += int((out == 0).sum())
        n += out.numel()
    assert within(zeros / n, p, n)


def test_dropconnect_per_sample_masks_differ_eval_is_plain_linear_and_bias():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 8), torch.randn(6)
    x = torch.randn(1, 8).repeat(32, 1)  # the same example 32 times
    batch = dropconnect_linear(x, w, b, 0.5, True, g, per_sample=False)
    sample = dropconnect_linear(x, w, b, 0.5, True, g, per_sample=True)
    assert torch.equal(batch, batch[:1].expand_as(batch))  # one mask for the whole batch
    assert len({tuple(r.tolist()) for r in sample}) > 1  # a mask per example
    assert torch.equal(dropconnect_linear(x, w, b, 0.5, False, g), F.linear(x, w, b))
    # bias not masked by default; masked (rate p, scale 1/(1-p)) with mask_bias
    zero_x, ones_b = torch.zeros(2000, 8), torch.ones(6)
    assert torch.equal(dropconnect_linear(zero_x, w, ones_b, 0.5, True, g), ones_b.expand(2000, 6))
    masked = dropconnect_linear(zero_x, w, ones_b, 0.25, True, g, mask_bias=True)
    assert only(masked, 0.0, 1 / 0.75)
    assert within(float((masked == 0).float().mean()), 0.25, masked.numel())
    with pytest.raises(ValueError, match="per_sample=False"):
        dropconnect_linear(torch.randn(2, 3, 8), w, b, 0.5, True, per_sample=True)


def head_mask(model: nn.Module) -> torch.Tensor:
    """Keep mask of the head's weights seen by one training forward of x = I (per-sample mask)."""
    fc = model.fc
    d = fc.in_features
    with torch.no_grad():
        out = fc(torch.eye(d)) - fc.bias  # out[j, c] = W[c, j] M_j[c, j] / (1 - p)
    return (out.T / fc.weight.detach() * 0.5).round()


def test_dropconnect_on_model_survives_in_place_rifle_reinit():
    model = tiny(num_classes=7)
    x = torch.randn(16, 3, 16, 16)
    model.eval()
    ref = model(x)
    _, opt = setup("dropconnect", model, p=0.5)
    assert torch.equal(model(x), ref)  # eval: the plain head
    model.train()
    mask = head_mask(model)
    assert only(mask, 0.0, 1.0)
    assert within(1 - float(mask.mean()), 0.5, mask.numel())
    weight = model.fc.weight
    before = weight.detach().clone()
    Rifle(model, opt, epochs=4, reinits=1, min_steps_after=None).reinit(1)
    assert model.fc.weight is weight and not torch.equal(weight, before)  # in place, new values
    mask = head_mask(model)  # still masked, with the new weights
    assert only(mask, 0.0, 1.0)
    assert within(1 - float(mask.mean()), 0.5, mask.numel())
    # gradient reaches the head weight through the mask in a full forward/backward
    model.zero_grad()
    torch.manual_seed(3)
    F.cross_entropy(model(x), torch.arange(16) % 7).backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


def test_dropconnect_needs_linear_head():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    ctx = ctx_for(model)
    ctx.head, ctx.head_names = [model[0]], ["0"]
    with pytest.raises(ValueError, match="nn.Linear"):
        create("dropconnect").setup(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx)


# ------------------------------------------------------------------------------- stochastic depth
def test_drop_rates_follow_the_linear_rule():
    assert drop_rates(4, 0.5) == [0.125, 0.25, 0.375, 0.5]
    assert drop_rates(3, 0.8) == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])
    assert drop_rates(2, 1.0) == [0.0, 0.0]
    with pytest.raises(ValueError):
        drop_rates(3, 0.0)


@pytest.mark.parametrize(
    "name,n_blocks",
    [
        ("tiny_cnn", 3),
        ("efficientnet_lite0", 9),
        ("torchvision:resnet18", 8),
        ("torchvision:efficientnet_b0", 9),
    ],
)
def test_stochastic_depth_rates_and_deterministic_eval(name, n_blocks):
    torch.manual_seed(0)
    model = create_model(name, 4, pretrained=name == "tiny_cnn").eval()
    torch.manual_seed(0)
    plain = create_model(name, 4, pretrained=name == "tiny_cnn").eval()
    params = [id(p) for p in model.parameters()]
    x = torch.randn(4, 3, 32, 32)
    sd = create("stochastic-depth", p_l=0.5)
    sd.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx_for(model))
    assert list(sd.rates.values()) == pytest.approx([0.5 * i / n_blocks for i in range(1, n_blocks + 1)])
    assert [id(p) for p in model.parameters()] == params  # no new parameters: optimizer unaffected
    # the rates are where the modules read them
    mods = dict(model.named_modules())
    for block, rate in sd.rates.items():
        m = mods[block]
        if name == "torchvision:resnet18":
            assert m.bn2.stochastic_depth_drop == rate
        elif name == "torchvision:efficientnet_b0":
            assert m.stochastic_depth.p == rate
        else:
            assert m.drop_path.drop_prob == rate
    if name == "efficientnet_lite0":  # blocks without a skip keep their Identity
        assert (
            sum(type(m.drop_path).__name__ == "DropPath" for m in model.modules() if hasattr(m, "has_skip"))
            == 9
        )
    with torch.no_grad():
        assert torch.equal(model(x), plain(x)) and torch.equal(model(x), model(x))  # eval: unchanged
        model.train(), plain.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        assert not torch.equal(a, model(x))  # training: random depth


def test_stochastic_depth_drops_branches_per_sample_at_the_rate():
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", 3, pretrained=False).train()
    last = model.layer4[1].bn2
    raw, out = [], []
    last.register_forward_hook(lambda m, a, o: raw.append(o.detach().clone()))  # before the trick
    create("stochastic-depth", p_l=0.5).setup(
        model, torch.optim.SGD(model.parameters(), lr=0.1), ctx_for(model)
    )
    last.register_forward_hook(lambda m, a, o: out.append(o.detach().clone()))  # after it
    torch.manual_seed(0)
    with torch.no_grad():
        model(torch.randn(400, 3, 32, 32))
    ratio = (out[0] / raw[0]).flatten(1)  # per sample: 0 (dropped) or 1 / survival = 2
    per_sample = ratio[:, 0]
    assert torch.allclose(ratio, per_sample[:, None].expand_as(ratio), atol=1e-5)
    assert only(per_sample, 0.0, 2.0)
    assert within(float((per_sample.round() == 0).float().mean()), 0.5, 400)  # last block: 1 - p_L


def test_stochastic_depth_unsupported_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert residual_blocks(model) == []
    with pytest.raises(ValueError, match="no residual block"):
        create("stochastic-depth").setup(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx_for(model))


# ----------------------------------------------------------------------------------- disturblabel
def test_disturblabel_change_rate_and_uniform_new_labels():
    n, c, alpha = 200_000, 10, 0.2
    y = torch.full((n,), 3)
    new = disturb_labels(y, c, alpha, torch.Generator().manual_seed(0))
    assert within(float((new != y).float().mean()), alpha * (c - 1) / c, n)
    for k in (0, 5, 9):  # every other class gets alpha / C
        assert within(float((new == k).float().mean()), alpha / c, n)
    assert torch.equal(disturb_labels(y, c, 0.0), y)
    assert set(disturb_labels(y, c, 1.0, torch.Generator().manual_seed(1)).unique().tolist()) == set(range(c))


def test_disturblabel_is_used_in_training_only(tmp_path):
    from rifle.build import load_data
    from rifle.config import TrainConfig
    from rifle.methods.disturblabel import DisturbLabel
    from rifle.run import run_train

    calls = []
    original = DisturbLabel.transform_batch

    def counting(self, x, y):
        calls.append(len(y))
        out = original(self, x, y)
        assert out[0] is x
        return out

    cfg = TrainConfig(
        data="digits",
        model="tiny_cnn",
        epochs=2,
        image_size=16,
        batch_size=64,
        train_fraction=0.2,
        trick=["disturblabel"],
        options={"disturblabel": {"alpha": 1.0}},
        out=str(tmp_path / "r"),
    ).validate()
    data = load_data(cfg)
    DisturbLabel.transform_batch = counting
    try:
        run_train(cfg, data=data, log=lambda s: None)
    finally:
        DisturbLabel.transform_batch = original
    assert sum(calls) == 2 * len(data.train)  # every training image, never a val / test one
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # alpha = 1: every training label is uniform noise (train accuracy ~ 1/10)
    assert all(r["train_acc"] < 0.3 for r in rows)


# -------------------------------------------------------------------------------------- cyclic lr
def test_sgdr_trace_restarts_on_rifle_periods():
    assert cycle_starts(12, 3) == [0, 4, 8] and cycle_starts(40, 4) == [0, 10, 20, 30]
    f = [sgdr_factor(e, 12, 3) for e in range(13)]
    assert [f[e] for e in (0, 4, 8)] == [1.0, 1.0, 1.0]
    assert f[1] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4))) and f[2] == pytest.approx(0.5)
    assert f[3] == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4))) and f[12] == pytest.approx(0.0)
    assert [e for e in range(1, 12) if f[e] > f[e - 1]] == [4, 8]  # two restarts
    g = [sgdr_factor(e, 12, 3, 0.1) for e in range(13)]
    assert all(0.1 - 1e-12 <= v <= 1.0 for v in g) and g[2] == pytest.approx(0.55)
    assert [sgdr_factor(e, 5, 2) for e in range(5)] == pytest.approx([1.0, 0.5, 1.0, 0.75, 0.25])


def test_cyclic_lr_cycles_default_to_rifle_periods_and_errors():
    model = tiny()
    ctx = ctx_for(model, epochs=12, config={"method": "rifle", "reinits": 2})
    lam = create("cyclic-lr").lr_lambda(ctx)
    assert [lam(e) for e in (0, 4, 8)] == [1.0, 1.0, 1.0] and lam(2) == pytest.approx(0.5)
    lam4 = create("cyclic-lr", cycles=4).lr_lambda(ctx)
    assert [e for e in range(1, 12) if lam4(e) > lam4(e - 1)] == [3, 6, 9]
    with pytest.raises(ValueError, match="do not fit"):
        create("cyclic-lr", cycles=13).lr_lambda(ctx)
    with pytest.raises(ValueError, match="reinits"):
        create("cyclic-lr").lr_lambda(ctx_for(model, epochs=12, config={"method": "rifle"}))
    # without RIFLE, reinits is ignored: 2 cycles (one restart at E/2), at most E
    fine = create("cyclic-lr").lr_lambda(
        ctx_for(model, epochs=12, config={"method": "finetune", "reinits": 2})
    )
    assert [e for e in range(1, 12) if fine(e) > fine(e - 1)] == [6]
    one = create("cyclic-lr").lr_lambda(ctx_for(model, epochs=1, config={"method": "finetune"}))
    assert one(0) == 1.0
    with pytest.raises(ValueError):
        create("cyclic-lr", min_factor=1.0)


# ------------------------------------------------------------------------------------------- CLI
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
    "--quiet",
]


def cli(argv, capsys):
    code = main(argv)
    _, err = capsys.readouterr()
    return code, err


VOLATILE = {"seconds", "images_per_s"}
TRICK_RUN = [*FAST, "--epochs", "4", "--lr", "0.1"]


def stable_rows(out) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def plain_rows(tmp_path_factory):
    """metrics.jsonl of the same run without any trick (finetune)."""
    root = tmp_path_factory.mktemp("plain")
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is function-scoped
        mp.setenv("RIFLE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rifle-cache"))
        assert main([*TRICK_RUN, "--out", str(root / "plain")]) == 0
    return stable_rows(root / "plain")


@pytest.mark.parametrize(
    "trick,flags,off",
    [
        ("dropout", ["--dropout-p", "0.3"], ["--dropout-p", "0"]),
        (
            "dropconnect",
            ["--dropconnect-p", "0.4", "--no-dropconnect-per-sample"],
            ["--dropconnect-p", "0", "--no-dropconnect-per-sample"],
        ),
        ("stochastic-depth", ["--stochastic-depth-p-l", "0.8"], ["--stochastic-depth-p-l", "1"]),
        ("disturblabel", ["--disturblabel-alpha", "0.2"], ["--disturblabel-alpha", "0"]),
        ("cyclic-lr", ["--cyclic-lr-cycles", "2"], None),
    ],
)
def test_cli_each_trick_changes_training_and_is_exact_when_off(
    tmp_path, capsys, plain_rows, trick, flags, off
):
    out = tmp_path / trick
    code, err = cli([*TRICK_RUN, "--trick", trick, *flags, "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trick"] == [trick] and summary["complete"]
    option = flags[0].removeprefix(f"--{trick}-").replace("-", "_")
    assert summary["methods"][trick][option] == (int(flags[1]) if trick == "cyclic-lr" else float(flags[1]))
    rows = stable_rows(out)
    plain_loss = [r["train_loss"] for r in plain_rows]
    if trick == "cyclic-lr":  # two 2-epoch cosine cycles instead of one 4-epoch cosine
        assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.05, 0.1, 0.05])
        assert [r["lr"] for r in plain_rows] == pytest.approx(
            [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
        )
        assert (
            rows[0] == plain_rows[0] and rows[1]["train_loss"] != plain_loss[1]
        )  # same until the LR differs
    else:  # the trick acts from the first epoch on
        assert [r["lr"] for r in rows] == [r["lr"] for r in plain_rows]
        assert rows[0]["train_loss"] != plain_loss[0]
    # still learns: 10 classes, chance 0.1 (measured 0.28-0.51 for the five tricks, 0.35 without)
    assert summary["final_test_acc"] > 0.2
    if off is not None:  # switched off, the trick's hooks leave training bit-identical to no trick
        code, err = cli([*TRICK_RUN, "--trick", trick, *off, "--out", str(tmp_path / "off")], capsys)
        assert code == 0, err
        assert stable_rows(tmp_path / "off") == plain_rows


def test_cli_rifle_with_three_tricks_restarts_lr_on_reinit_epochs(tmp_path, capsys):
    out = tmp_path / "combo"
    code, err = cli(
        [
            *FAST,
            "--epochs",
            "6",
            "--method",
            "rifle",
            "--reinits",
            "2",
            "--trick",
            "dropout",
            "--trick",
            "disturblabel",
            "--trick",
            "cyclic-lr",
            "--lr",
            "0.01",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reinit"] for r in rows] == [False, False, True, False, True, False]
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.005] * 3)  # restarts at 2 and 4 = re-inits
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trick"] == ["dropout", "disturblabel", "cyclic-lr"] and summary["reinit_epochs"] == [2, 4]


def test_cli_cyclic_lr_too_many_cycles_is_a_clear_error(tmp_path, capsys):
    code, err = cli(
        [
            *FAST,
            "--epochs",
            "2",
            "--trick",
            "cyclic-lr",
            "--cyclic-lr-cycles",
            "3",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert code == 2 and "cycles do not fit" in err and "--cyclic-lr-cycles" in err and "Traceback" not in err


def test_cyclic_lr_with_the_converged_trigger_is_refused_before_any_work(tmp_path, capsys):
    """Its restarts fall on the schedule trigger's points, which the converged trigger does not follow."""
    from rifle.experiments.grid import GridError, parse_grid

    # the methods layer (a config built without the CLI), whatever the cycles
    ctx = ctx_for(tiny(), epochs=12, config={"method": "rifle", "reinits": 2, "reinit_trigger": "converged"})
    for cycles in (None, 3):
        with pytest.raises(ValueError, match="cannot be combined with --reinit-trigger converged"):
            create("cyclic-lr", cycles=cycles).lr_lambda(ctx)
    # the command line: exit 2, the message, no traceback, and nothing written
    out = tmp_path / "r"
    code, err = cli(
        [
            *FAST,
            "--epochs",
            "4",
            "--method",
            "rifle",
            "--reinits",
            "1",
            "--reinit-trigger",
            "converged",
            "--trick",
            "cyclic-lr",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in err, err
    assert "--trick cyclic-lr cannot be combined with --reinit-trigger converged" in err, err
    assert not out.exists()
    # a grid entry is refused when the grid is read, naming the entry
    spec = {
        "datasets": ["digits"],
        "models": ["tiny_cnn"],
        "seeds": [0],
        "train": {"epochs": 4},
        "methods": [{"name": "rifle", "label": "r", "reinit_trigger": "converged", "trick": "cyclic-lr"}],
    }
    with pytest.raises(GridError, match=r"methods\[0\] \(r\).*cyclic-lr cannot be combined"):
        parse_grid(spec)
    # the schedule trigger, and the converged trigger without cyclic-lr, are still accepted
    ok = create("cyclic-lr").lr_lambda(
        ctx_for(tiny(), epochs=12, config={"method": "rifle", "reinits": 2, "reinit_trigger": "schedule"})
    )
    assert [ok(e) for e in (0, 4, 8)] == [1.0, 1.0, 1.0]
    spec["methods"][0].pop("trick")
    parse_grid(spec)
