"""The transfer regularisers (--reg l2sp | delta | bss) against hand-computed values, and end to end."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import interrupted_at_epoch
from rifle.cli import main
from rifle.core.structure import resolve_layers
from rifle.methods import create, registry
from rifle.methods._channel_attention import attention_from_scores, exact_scores, first_order_scores
from rifle.methods._penalties import squared_distance
from rifle.methods.base import RunContext
from rifle.methods.bss import bss_penalty
from rifle.methods.delta import feature_map_distance


class TwoLayer(nn.Module):
    """backbone: Linear(3, 4) + BatchNorm1d(4) (affine params + running-stat buffers); head: fc."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.body(x))))


def _ctx(model, head_name="fc", loader=None, **config):
    head = [model.get_submodule(head_name)]
    logs = []
    ctx = RunContext(
        epochs=1,
        steps_per_epoch=1,
        seed=0,
        num_classes=2,
        head=head,
        head_names=[head_name],
        train_loader=loader,
        config={"weight_decay": 1e-4, **config},
        pretrained_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        log=logs.append,
    )
    return ctx, logs


def _groups(model):
    head = {id(p) for p in model.fc.parameters()}
    return [
        {
            "name": "backbone",
            "params": [p for p in model.parameters() if id(p) not in head],
            "weight_decay": 1e-4,
        },
        {"name": "head", "params": list(model.fc.parameters()), "weight_decay": 1e-4},
    ]


# ------------------------------------------------------------------------------------------- L2-SP
def test_l2sp_equals_the_formula_on_a_two_layer_model():
    torch.manual_seed(0)
    model = TwoLayer()
    ctx, _ = _ctx(model)
    reg = create("l2sp", alpha=0.3, beta=0.05)
    reg.setup(model, None, ctx)
    deltas = {"body.weight": 0.1, "body.bias": -0.2, "bn.weight": 0.3, "bn.bias": 0.05}
    with torch.no_grad():
        for name, d in deltas.items():
            model.get_parameter(name).add_(d)
        model.bn.running_mean.add_(5.0)  # buffers are not parameters: ignored
        model.bn.running_var.mul_(3.0)
        model.fc.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 0.0, 3.0]]))
        model.fc.bias.copy_(torch.tensor([2.0, -1.0]))
    terms = reg.loss_terms(None, None, None, None)
    n = {name: model.get_parameter(name).numel() for name in deltas}
    expected_sp = 0.3 / 2 * sum(n[k] * d**2 for k, d in deltas.items())  # 12*.01 + 4*.04 + 4*.09 + 4*.0025
    expected_head = 0.05 / 2 * (1 + 4 + 1 + 0.25 + 9 + 4 + 1)
    assert float(terms["l2sp"].detach()) == pytest.approx(expected_sp, rel=1e-5)
    assert float(terms["l2sp_head"].detach()) == pytest.approx(expected_head, rel=1e-6)
    sum(terms.values()).backward()
    # d/dw alpha/2 ||w - w0||^2 = alpha (w - w0)
    assert torch.allclose(model.body.weight.grad, torch.full((4, 3), 0.3 * 0.1), atol=1e-6)
    assert torch.allclose(model.bn.weight.grad, torch.full((4,), 0.3 * 0.3), atol=1e-6)
    assert torch.allclose(model.fc.weight.grad, 0.05 * model.fc.weight.detach())


def test_l2sp_is_zero_with_finite_zero_gradient_at_the_pretrained_point():
    model = TwoLayer()
    ctx, _ = _ctx(model)
    reg = create("l2sp")
    reg.setup(model, None, ctx)
    terms = reg.loss_terms(None, None, None, None)
    assert float(terms["l2sp"].detach()) == 0.0
    terms["l2sp"].backward()
    for p in (model.body.weight, model.body.bias, model.bn.weight, model.bn.bias):
        assert torch.equal(p.grad, torch.zeros_like(p))
    # the functional form agrees with a plain loop
    a, b = [torch.randn(3, 2), torch.randn(5)], [torch.randn(3, 2), torch.randn(5)]
    assert float(squared_distance(a, b)) == pytest.approx(
        sum(float((x - y).square().sum()) for x, y in zip(a, b)), rel=1e-5
    )


def test_l2sp_head_term_touches_only_the_head():
    torch.manual_seed(1)
    model = TwoLayer()
    ctx, _ = _ctx(model)
    reg = create("l2sp", alpha=0.01, beta=0.1)
    reg.setup(model, None, ctx)
    before = reg.loss_terms(None, None, None, None)
    before["l2sp_head"].backward()
    before = {k: v.detach() for k, v in before.items()}
    for p in (model.body.weight, model.body.bias, model.bn.weight, model.bn.bias):
        assert p.grad is None or not p.grad.any()
    assert model.fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
    after = {k: v.detach() for k, v in reg.loss_terms(None, None, None, None).items()}
    assert float(after["l2sp"]) == float(before["l2sp"]) == 0.0
    assert float(after["l2sp_head"]) != pytest.approx(float(before["l2sp_head"]))


@pytest.mark.parametrize("name", ["l2sp", "delta"])
def test_weight_decay_is_zero_in_every_group(name):
    model = TwoLayer()
    ctx, logs = _ctx(model)
    groups = create(name).configure_param_groups(_groups(model), ctx)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert any("--weight-decay 0.0001 is ignored" in line for line in logs)
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=1e-4)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


# --------------------------------------------------------------------------------------------- BSS
def test_bss_matches_numpy_svd():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 4)).astype(np.float64)
    s = np.linalg.svd(f, compute_uv=False)  # descending, 4 values
    for k in (1, 2, 3):
        got = float(bss_penalty(torch.from_numpy(f), k))
        assert got == pytest.approx(float(np.sum(s[-k:] ** 2)), rel=1e-10)
    # B < D: min(B, D) = 3 values; k is clipped so that the largest one is never penalised
    g = rng.normal(size=(3, 5))
    s3 = np.linalg.svd(g, compute_uv=False)
    assert float(bss_penalty(torch.from_numpy(g), 5)) == pytest.approx(float(np.sum(s3[1:] ** 2)), rel=1e-10)
    assert float(bss_penalty(torch.from_numpy(g[:1]), 1)) == 0.0  # one sample: nothing to shrink
    # the method scales by eta, and the gradient reaches the features
    feats = torch.from_numpy(f).float().requires_grad_(True)
    term = create("bss", k=1, eta=0.5).loss_terms(None, feats, None, None)["bss"]
    assert float(term.detach()) == pytest.approx(0.5 * s[-1] ** 2, rel=1e-4)
    term.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="features"):
        create("bss").loss_terms(None, None, None, None)


def test_bss_in_the_trainer_penalises_the_head_input_known_answer(tmp_path):
    # the trainer's captured features are the pooled input of the head: the term it adds equals
    # eta * (sum of the k smallest squared singular values) of those features computed independently
    import copy

    from rifle.build import load_data
    from rifle.config import TrainConfig
    from rifle.models import create_model, model_preprocessing
    from rifle.train import RunDir, Trainer

    data = load_data(
        TrainConfig(data="digits", model="tiny_cnn", image_size=16, train_fraction=0.1).validate()
    )
    torch.manual_seed(0)
    model = create_model("tiny_cnn", data.num_classes)
    bss = create("bss", k=3, eta=0.25)
    trainer = Trainer(
        model,
        data,
        [bss],
        epochs=1,
        batch_size=16,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        lr_schedule="constant",
        image_size=16,
        seed=0,
        preprocessing=model_preprocessing(model),
        run_dir=RunDir(tmp_path / "r"),
        device=torch.device("cpu"),
        channels_last=False,
    )
    x, y = next(iter(trainer._train_iter(0)))
    body = copy.deepcopy(model).train()
    body.fc = nn.Identity()  # the same network without its head: the pooled feature
    with torch.no_grad():
        feats = body(x).double().numpy()
    assert feats.shape == (16, model.fc.in_features)
    s = np.linalg.svd(feats, compute_uv=False)
    terms = {}
    model.train()
    trainer._loss(x, y, terms, 0, 0)
    assert float(terms["bss"]) / len(y) == pytest.approx(0.25 * float(np.sum(s[-3:] ** 2)), rel=1e-4)


# ------------------------------------------------------------------------------------------- DELTA
def test_attention_is_the_softmax_of_z_scores():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, -1.0])
    s = scores.numpy().astype(np.float64)
    z = (s - s.mean()) / s.std()  # population std
    e = np.exp(z / 5.0)
    expected = e / e.sum()
    got = attention_from_scores(scores, 5.0)
    assert np.allclose(got.numpy(), expected, atol=1e-7)
    assert (got > 0).all() and float(got.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(attention_from_scores(torch.full((4,), 3.0)), torch.full((4,), 0.25))


def test_feature_map_distance_formula():
    torch.manual_seed(0)
    f, f0 = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    att = torch.tensor([0.25, 0.75])
    d = ((f - f0) ** 2).sum(dim=(2, 3)).numpy()  # (B, C)
    # the authors' normalisation: 1/2 sum_b sum_c C * a_c * ||.||^2 / (H W)
    expected = 0.5 * sum(2 * att[c].item() * d[b, c] / 20 for b in range(3) for c in range(2))
    got = feature_map_distance({"l": f}, {"l": f0}, {"l": att})
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(feature_map_distance({"l": f}, {"l": f0}, {"l": att}, scale=0.5)) == pytest.approx(
        expected / 3, rel=1e-5
    )


def _hand_model():
    """feat (1x1 conv, identity) -> global average pool -> fc with fixed weights; all frozen."""
    model = nn.Sequential(
        OrderedDict(
            feat=nn.Conv2d(2, 2, 1, bias=False),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(2, 3),
        )
    )
    with torch.no_grad():
        model.feat.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        model.fc.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.0]]))
        model.fc.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _np_ce(logits, y):
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean(), np.exp(logp)


def test_exact_and_first_order_channel_scores_by_hand():
    model = _hand_model()
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]], [[[0.5, 0.5]], [[-2.0, 4.0]]]])  # (B=2, C=2, 1, 2)
    y = torch.tensor([2, 1])
    W, b = model.fc.weight.numpy().astype(np.float64), model.fc.bias.numpy().astype(np.float64)
    a = x.numpy().astype(np.float64)
    pooled = a.mean(axis=(2, 3))
    loss0, p = _np_ce(pooled @ W.T + b, y.numpy())
    exact = []
    for c in range(2):
        q = pooled.copy()
        q[:, c] = 0
        exact.append(_np_ce(q @ W.T + b, y.numpy())[0] - loss0)
    got = exact_scores(model, ["feat"], [(x, y)])["feat"].numpy()
    assert np.allclose(got, exact, atol=1e-6)
    # first order: dL/da_{b,c,h,w} = (p_b - onehot_b) . W[:, c] / (B H W); score = |-sum a * g|
    onehot = np.eye(3)[y.numpy()]
    g = ((p - onehot) @ W)[:, :, None, None] / (2 * 1 * 2) * np.ones_like(a)
    expected = np.abs(-(a * g).sum(axis=(0, 2, 3)))
    fo = first_order_scores(model, ["feat"], [(x, y)])["feat"].numpy()
    assert np.allclose(fo, expected, atol=1e-6)
    # averaged over batches
    two = first_order_scores(model, ["feat"], [(x, y), (x, y)])["feat"].numpy()
    assert np.allclose(two, expected, atol=1e-6)


class TwoConv(nn.Module):
    """c1: conv 2->3 (3x3) -> relu -> c2: conv 3->2 (3x3, stride 2) -> relu -> mean pool -> fc."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(dim=(2, 3)))


@pytest.mark.parametrize("batch_size", [4, 8])
def test_delta_terms_known_answer_on_a_two_conv_model(batch_size):
    # Omega = alpha * sum_l C_l/(H_l W_l) * sum_c a_lc * 1/2 sum_b ||F_lbc - F0_lbc||^2 * (B_run / B)
    #       + beta/2 (||W_head||^2 + ||b_head||^2), with given attention a (no attention batches drawn)
    torch.manual_seed(0)
    model = TwoConv()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    att = {"c1": torch.tensor([0.2, 0.3, 0.5]), "c2": torch.tensor([0.9, 0.1])}
    ctx, _ = _ctx(model, batch_size=batch_size)
    reg = create("delta", alpha=0.7, beta=0.3, layers="c1,c2")
    reg.load_state_dict({"layers": ["c1", "c2"], "attention": att})
    reg.setup(model, None, ctx)
    with torch.no_grad():  # move away from the pretrained point
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 2, 6, 6)  # a micro-batch of 4 of a --batch-size batch_size batch
    y = torch.tensor([0, 1, 2, 0])
    model.train()
    logits = model(x)
    terms = reg.loss_terms(logits, None, x, y)

    def maps(state):  # the two layers' outputs, computed with plain convolutions
        f1 = F.conv2d(x, state["c1.weight"], state["c1.bias"], padding=1)
        f2 = F.conv2d(torch.relu(f1), state["c2.weight"], state["c2.bias"], stride=2, padding=1)
        return {"c1": f1.double().numpy(), "c2": f2.double().numpy()}

    now = {k: v.detach() for k, v in model.state_dict().items()}
    f, f0 = maps(now), maps(w0)
    expected = 0.0
    for name, a in att.items():
        _, c, h, w = f[name].shape
        sq = ((f[name] - f0[name]) ** 2).sum(axis=(2, 3))  # (B, C)
        expected += c / (h * w) * sum(a[ch].item() * 0.5 * sq[:, ch].sum() for ch in range(c))
    expected *= 0.7 * batch_size / 4
    assert float(terms["delta"].detach()) == pytest.approx(expected, rel=1e-5)
    head = float((now["fc.weight"].double() ** 2).sum() + (now["fc.bias"].double() ** 2).sum())
    assert float(terms["delta_head"].detach()) == pytest.approx(0.5 * 0.3 * head, rel=1e-6)
    # the gradient of the head term is beta * w_head; the feature term reaches the convolutions
    sum(terms.values()).backward()
    assert model.c1.weight.grad is not None and model.c1.weight.grad.abs().sum() > 0
    assert torch.allclose(model.fc.weight.grad, 0.3 * model.fc.weight.detach(), atol=1e-7)


def _tiny_setup(**options):
    from rifle.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, 3, 16, 16, generator=g).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(2)
    ]
    calls = []

    def loader():
        calls.append(1)
        return iter(batches)

    ctx, logs = _ctx(model, loader=loader, batch_size=8)
    options.setdefault("attention_batches", 2)
    reg = create("delta", **options)
    return model, reg, ctx, batches, calls, logs


def test_delta_is_zero_at_the_pretrained_point_and_the_frozen_copy_stays_frozen():
    model, reg, ctx, batches, _, logs = _tiny_setup()
    model.fc.register_forward_pre_hook(lambda m, a: logs.append("hook!"))  # must not be copied
    reg.setup(model, None, ctx)
    assert reg.layer_names == ["blocks.0", "blocks.1", "blocks.2"]
    for name, att in reg.channel_attention.items():
        assert (att > 0).all() and float(att.sum()) == pytest.approx(1.0, abs=1e-5), name
    assert [len(reg.channel_attention[n]) for n in reg.layer_names] == [16, 24, 48]
    x, y = batches[0]
    model.eval()  # same BN statistics as the frozen copy: identical feature maps
    logs.clear()
    logits = model(x)
    terms = reg.loss_terms(logits, None, x, y)
    assert float(terms["delta"].detach()) == 0.0
    assert logs == ["hook!"]  # the model's hook ran once; the frozen copy has no hooks
    assert not reg.frozen.fc._forward_pre_hooks and model.fc._forward_pre_hooks
    # after a step away from the pretrained point the distance is positive
    model.train()
    assert not reg.frozen.training and not any(m.training for m in reg.frozen.modules())
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y) + sum(reg.loss_terms(logits, None, x, y).values())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in reg.frozen.parameters())
    assert model.blocks[0].conv1.weight.grad is not None
    with torch.no_grad():
        model.blocks[1].conv1.weight.add_(0.05)
    model.eval()
    logits = model(x)
    assert float(reg.loss_terms(logits, None, x, y)["delta"].detach()) > 0
    # the frozen copy holds the pretrained weights, not the model's
    assert torch.equal(reg.frozen.blocks[1].conv1.weight, ctx.pretrained_state["blocks.1.conv1.weight"])
    # evaluation forwards (no autograd) are not recorded
    with torch.inference_mode():
        model(x)
    assert reg._tap.outputs == {}


def test_delta_attention_is_saved_and_restored_without_recomputing():
    model, reg, ctx, _, calls, _ = _tiny_setup()
    reg.setup(model, None, ctx)
    assert calls == [1]
    state = reg.state_dict()
    assert state["layers"] == reg.layer_names
    state["attention"] = {k: torch.full_like(v, 1.0 / len(v)) for k, v in state["attention"].items()}
    model2, reg2, ctx2, _, calls2, logs2 = _tiny_setup()
    reg2.load_state_dict(state)  # the trainer restores before setup
    reg2.setup(model2, None, ctx2)
    assert calls2 == []  # no attention batches drawn
    assert any("restored" in line for line in logs2)
    for k, v in state["attention"].items():
        assert torch.equal(reg2.channel_attention[k], v)


def test_delta_exact_and_uniform_attention_modes():
    model, reg, ctx, _, _, _ = _tiny_setup(attention="uniform")
    reg.setup(model, None, ctx)
    assert torch.allclose(reg.channel_attention["blocks.2"], torch.full((48,), 1 / 48))
    model, reg, ctx, _, _, _ = _tiny_setup(
        attention="exact", layers="blocks.0", attention_batches=1, attention_head="pretrained"
    )
    reg.setup(model, None, ctx)
    assert list(reg.channel_attention) == ["blocks.0"] and len(reg.channel_attention["blocks.0"]) == 16


def test_delta_frozen_bn_modes_at_the_pretrained_point_in_training_mode():
    for frozen_bn, is_zero in (("batch", True), ("eval", False)):
        model, reg, ctx, batches, _, _ = _tiny_setup(frozen_bn=frozen_bn, attention="uniform")
        reg.setup(model, None, ctx)
        x, y = batches[0]
        model.train()  # batch statistics in the fine-tuned model
        value = float(reg.loss_terms(model(x), None, x, y)["delta"].detach())
        assert (value < 1e-8) == is_zero, (frozen_bn, value)
        assert not any(m.training for m in reg.frozen.modules())


def test_delta_unknown_layer_lists_the_available_layers():
    model, reg, ctx, _, _, _ = _tiny_setup(layers="blocks.1,blocks.7")
    with pytest.raises(ValueError) as e:
        reg.setup(model, None, ctx)
    msg = str(e.value)
    assert "'blocks.7'" in msg and "Available layers" in msg
    for name in ("blocks.0", "blocks.1", "blocks.2", "stem"):
        assert name in msg
    assert "fc" not in msg.split("Available layers")[1].split("(any")[0].split(", ")
    with pytest.raises(ValueError, match="head"):
        resolve_layers(model, "fc", ["fc"])
    with pytest.raises(ValueError, match="attention"):
        create("delta", attention="magic")


# ------------------------------------------------------------------------------------- end to end
FAST = [
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--image-size",
    "16",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--train-fraction",
    "0.3",
    "--quiet",
]


@pytest.mark.parametrize(
    "reg,extra,terms",
    [
        ("l2sp", [], ["l2sp", "l2sp_head"]),
        ("bss", ["--bss-k", "2"], ["bss"]),
        ("delta", ["--delta-attention-batches", "2"], ["delta", "delta_head"]),
    ],
)
def test_cli_smoke_run_per_regulariser(tmp_path, capsys, reg, extra, terms):
    out = tmp_path / reg
    code = main(["train", *FAST, "--reg", reg, *extra, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for t in terms:
        assert all(np.isfinite(r[f"loss_{t}"]) and r[f"loss_{t}"] >= 0 for r in rows), t
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reg"] == reg and reg in summary["methods"]
    if reg == "bss":
        assert summary["methods"]["bss"]["k"] == 2


def test_cli_rifle_with_delta_and_dropout(tmp_path, capsys):
    if "dropout" not in registry():
        pytest.skip("no 'dropout' trick registered yet")
    out = tmp_path / "combo"
    code = main(
        [
            "train",
            *FAST,
            "--method",
            "rifle",
            "--reinits",
            "1",
            "--reg",
            "delta",
            "--delta-attention-batches",
            "1",
            "--trick",
            "dropout",
            "--out",
            str(out),
        ]
    )
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["reinit"] for r in rows] == [False, True]
    assert all("loss_delta" in r for r in rows)


def test_delta_resume_restores_the_attention_and_reproduces_the_run(tmp_path, monkeypatch):
    from rifle.config import TrainConfig
    from rifle.run import run_train
    from rifle.train.checkpoint import WEIGHTS
    from safetensors.torch import load_file

    def cfg(name):
        return TrainConfig(
            data="digits",
            model="tiny_cnn",
            epochs=2,
            image_size=16,
            batch_size=64,
            train_fraction=0.3,
            reg="delta",
            options={"delta": {"attention_batches": 2}},
            out=str(tmp_path / name),
        ).validate()

    full = run_train(cfg("full"), log=lambda s: None)
    with interrupted_at_epoch(1), pytest.raises(KeyboardInterrupt):
        run_train(cfg("split"), log=lambda s: None)
    logs = []
    resumed = run_train(cfg("split"), resume=True, log=logs.append)
    assert any("attention restored from the checkpoint" in line for line in logs)
    assert resumed["final_test_acc"] == full["final_test_acc"]
    wa, wb = load_file(str(tmp_path / "full" / WEIGHTS)), load_file(str(tmp_path / "split" / WEIGHTS))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_delta_warns_when_the_backbone_drifts_far_after_the_first_epoch():
    import warnings
    from rifle.methods.delta import backbone_drift

    a, a0 = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    b, b0 = torch.zeros(2, 2), torch.zeros(2, 2)
    assert backbone_drift([(a, a0), (b, b0)]) == pytest.approx(5.0 / 4.0)  # ||(3,-4)|| / ||(0,4)||
    model, reg, ctx, _, _, _ = _tiny_setup(attention="uniform")
    reg.setup(model, None, ctx)
    assert reg._drift_pairs and not any(p is model.fc.weight for p, _ in reg._drift_pairs)  # backbone only
    assert all(p.dim() > 1 for p, _ in reg._drift_pairs)  # conv / linear weights, not BatchNorm's affine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.on_epoch_start(0)  # nothing to check before the first epoch
        reg.on_epoch_start(1)  # unchanged weights: drift 0, no warning
    assert reg._drift_checked
    reg._drift_checked = False
    with torch.no_grad():
        for p, _ in reg._drift_pairs:
            p.mul_(-1.0)  # ||-W0 - W0|| / ||W0|| = 2
    with pytest.warns(UserWarning, match=r"after epoch 2 the backbone weights are 2\.00 .*--delta-alpha"):
        reg.on_epoch_start(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.on_epoch_start(4)  # once per process
