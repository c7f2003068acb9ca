"""--opt (timm's optimizers), --opt-eps / --opt-betas, --layer-decay, and RIFLE's state reset with Adam."""

import math

import pytest
import torch
import yaml

from conftest import metrics, run_cli
from rifle.build import build_methods, load_data
from rifle.config import ConfigError, TrainConfig, diff_configs
from rifle.methods.base import Method
from rifle.models import create_model, model_preprocessing
from rifle.train import RunDir, Trainer
from rifle.train.optim import build_optimizer, layer_ids, optimizer_names, split_by_layer

TINY = dict(data="digits", model="tiny_cnn", image_size=16, batch_size=64, lr=0.05, train_fraction=0.2)


def tiny_groups(model, head_lr=None):
    ps = list(model.named_parameters())
    head = {"name": "head", "params": [p for n, p in ps if n.startswith("fc.")], "weight_decay": 0.0}
    if head_lr is not None:
        head["lr"] = head_lr
    return [
        {"name": "backbone", "params": [p for n, p in ps if not n.startswith("fc.")], "weight_decay": 1e-4},
        head,
    ]


def make_trainer(tmp_path, methods, **kw):
    cfg = TrainConfig(
        **{**TINY, "epochs": 2, **{k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__}}
    )
    cfg.validate()
    data = load_data(cfg)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", data.num_classes)
    (tmp_path / "r").mkdir(exist_ok=True)
    return Trainer(
        model,
        data,
        methods,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        image_size=cfg.image_size,
        seed=0,
        preprocessing=model_preprocessing(model),
        run_dir=RunDir(tmp_path / "r"),
        device=torch.device("cpu"),
        channels_last=False,
        opt=cfg.opt,
        opt_eps=cfg.opt_eps,
        opt_betas=cfg.opt_betas,
        layer_decay=cfg.layer_decay,
        config=cfg.to_dict(),
        log=lambda s: None,
    )


# ------------------------------------------------------------------------------------- the default
def test_default_is_the_papers_torch_sgd_with_the_same_groups(tmp_path):
    # what `rifle train` built before --opt existed: torch.optim.SGD(groups, lr, momentum, weight_decay)
    trainer = make_trainer(tmp_path, [])
    opt = trainer.optimizer
    assert type(opt) is torch.optim.SGD
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10)
    expected = torch.optim.SGD(tiny_groups(model), lr=0.05, momentum=0.9, weight_decay=1e-4)
    strip = lambda gs: [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in gs]  # noqa: E731
    got = strip(opt.param_groups)
    want = strip(expected.param_groups)
    want[1]["weight_decay"] = 1e-4  # the trainer's head group has the run's weight decay
    assert got == want
    assert got[0]["nesterov"] is False and got[0]["momentum"] == 0.9 and got[0]["dampening"] == 0


# ------------------------------------------------------------------------------ every timm optimizer
# bnb* / fused* need CUDA; kron* builds its preconditioner with torch.compile (tens of seconds): slow
CPU_ONLY = [
    pytest.param(n, marks=[pytest.mark.slow, pytest.mark.extended]) if n.startswith("kron") else n
    for n in optimizer_names()
    if not n.startswith(("bnb", "fused"))
]


# optimizers that keep no step count (momentum / sign methods)
STEPLESS = {
    "sgd",
    "momentum",
    "nesterov",
    "nesterovw",
    "sgdw",
    "sgdc",
    "csgdc",
    "csgdw",
    "sgdp",
    "csgdp",
    "lars",
    "larc",
    "nlars",
    "nlarc",
    "lion",
    "lionc",
    "clion",
    "clionc",
}


@pytest.mark.parametrize("name", CPU_ONLY)
def test_every_optimizer_keeps_the_groups_and_steps(name):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, pretrained=False)
    groups = tiny_groups(model, head_lr=0.5)
    opt = build_optimizer(groups, opt=name, lr=0.01, momentum=0.9, weight_decay=1e-4)
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head"]
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    before = model.fc.weight.detach().clone()
    x = torch.randn(4, 3, 16, 16)
    g = []  # the head's gradient at each step (its group has no weight decay)
    for _ in range(2):
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        g.append(model.fc.weight.grad.detach().clone())
        opt.step()
    assert not torch.equal(before, model.fc.weight)
    state = opt.state[model.fc.weight]  # per-parameter state: what RIFLE's reset clears
    assert state
    # the step count, per parameter or (timm's Lamb, Adan) per group, is the 2 steps taken
    step = state.get("step", opt.param_groups[1].get("step"))
    if step is None:
        assert name in STEPLESS, (name, list(state))
    else:
        assert float(step) == 2.0, (name, step)
    for v in state.values():  # per-element state has the head's shape
        assert not torch.is_tensor(v) or v.dim() == 0 or v.shape == before.shape, name
    if name in ("sgd", "momentum", "nesterov"):  # torch SGD: buf = g1, then 0.9 * buf + g2
        torch.testing.assert_close(state["momentum_buffer"], 0.9 * g[0] + g[1], rtol=1e-6, atol=0)
    if name in ("adam", "adamw"):  # m, v start at 0: m2 = b1 (1 - b1) g1 + (1 - b1) g2, v likewise with g²
        assert opt.param_groups[1]["betas"] == (0.9, 0.999)
        torch.testing.assert_close(state["exp_avg"], 0.9 * 0.1 * g[0] + 0.1 * g[1], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(
            state["exp_avg_sq"], 0.999 * 0.001 * g[0] ** 2 + 0.001 * g[1] ** 2, rtol=1e-5, atol=1e-15
        )


def test_timm_sgd_is_nesterov_here():
    model = create_model("tiny_cnn", 3, pretrained=False)
    nesterov = build_optimizer(tiny_groups(model), opt="nesterov", lr=0.01, momentum=0.9, weight_decay=0.0)
    assert nesterov.param_groups[0]["nesterov"] is True
    assert (
        build_optimizer(
            tiny_groups(model), opt="momentum", lr=0.01, momentum=0.9, weight_decay=0.0
        ).param_groups[0]["nesterov"]
        is False
    )


def test_eps_and_betas_reach_the_optimizer():
    model = create_model("tiny_cnn", 3, pretrained=False)
    opt = build_optimizer(
        tiny_groups(model), opt="adamw", lr=1e-3, momentum=0.9, weight_decay=0.05, eps=1e-6, betas=(0.8, 0.99)
    )
    assert type(opt) is torch.optim.AdamW
    assert all(g["eps"] == 1e-6 and g["betas"] == (0.8, 0.99) for g in opt.param_groups)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(opt="adamww"), r"--opt='adamww': unknown optimizer \(did you mean adamw"),
        (dict(opt="lookahead_adamw"), "Lookahead keeps the per-parameter state"),
        (dict(opt="adahessian"), "second-order backward"),
        (dict(opt_eps=1e-8), "has no eps: --opt-eps applies"),
        (dict(opt_betas=[0.9, 0.99]), "has no betas: --opt-betas applies"),
        (dict(opt="adamw", opt_betas=[0.9]), "--opt-betas=.*two numbers"),
        (dict(opt="adamw", opt_betas="0.9,1.5"), r"--opt-betas=.*\[0, 1\)"),
        (dict(opt="adamw", opt_eps=0), "--opt-eps=0.0: must be > 0"),
        (dict(layer_decay=0), r"--layer-decay=0.0: a factor in \(0, 1\]"),
        (dict(layer_decay=1.5), r"--layer-decay=1.5"),
    ],
)
def test_bad_optimizer_settings_name_the_flag(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw).validate()


def test_settings_are_normalised():
    cfg = TrainConfig(opt=" AdamW ", opt_betas="0.9, 0.95", opt_eps="1e-8", layer_decay="0.75").validate()
    assert (cfg.opt, cfg.opt_betas, cfg.opt_eps, cfg.layer_decay) == ("adamw", [0.9, 0.95], 1e-8, 0.75)


def test_optimizer_keys_are_compared_on_resume_and_old_configs_resume():
    old = {
        k: v
        for k, v in TrainConfig().to_dict().items()
        if k not in ("opt", "opt_eps", "opt_betas", "layer_decay")
    }  # a config.yaml before these keys
    assert diff_configs(old, TrainConfig().validate().to_dict()) == {}
    now = TrainConfig(opt="adamw", layer_decay=0.8).validate().to_dict()
    assert diff_configs(old, now) == {"layer_decay": (None, 0.8), "opt": ("sgd", "adamw")}


# ------------------------------------------------------------------------------------- layer decay
def test_layer_decay_scales_by_hand_and_composes_with_the_schedule(tmp_path):
    # tiny_cnn: stem (0), blocks.0 (1), blocks.1 (2), blocks.2 (3), fc (4): L = 5, scale 0.5**(4-i)
    trainer = make_trainer(
        tmp_path, build_methods(TrainConfig(**TINY, reg="l2sp").validate()), layer_decay=0.5, opt="adamw"
    )
    groups = trainer.optimizer.param_groups
    assert [(g["name"], g["layer_lr_scale"]) for g in groups] == [
        ("backbone.layer0", 1 / 16),
        ("backbone.layer1", 1 / 8),
        ("backbone.layer2", 1 / 4),
        ("backbone.layer3", 1 / 2),
        ("head.layer4", 1.0),
    ]
    assert [g["lr"] for g in groups] == [0.05 * s for s in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)]
    assert all(g["weight_decay"] == 0.0 for g in groups)  # L2-SP's groups survive the split
    assert sum(len(g["params"]) for g in groups) == len(list(trainer.model.parameters()))
    trainer.fit()
    # epoch 1 of 2, cosine: lr * scale * 0.5 * (1 + cos(pi / 2)); the row's lr is the unscaled one
    row = trainer.history[1]
    assert row["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert row["lr_groups"]["backbone.layer0"] == pytest.approx(row["lr"] / 16)
    assert row["lr_groups"]["head.layer4"] == pytest.approx(row["lr"])


def test_layer_decay_without_group_matcher_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="--layer-decay needs a model .* group_matcher.*Sequential has none"):
        split_by_layer([{"params": list(model.parameters())}], model, 0.5, 0.1)


def test_layer_order_of_a_timm_model_puts_the_head_last():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    ids, n = layer_ids(model)
    assert n == 10 and ids["conv1.weight"] == 0 and ids["layer4.1.conv2.weight"] == 8
    assert ids["fc.weight"] == ids["fc.bias"] == 9


# ---------------------------------------------------------------------- RIFLE's reset with AdamW
class StateProbe(Method):
    """Snapshots the optimizer state after each epoch and checks it right after RIFLE's re-init."""

    name = "probe"

    def __init__(self):
        self.seen = {}

    def setup(self, model, optimizer, ctx):
        self.opt, self.head = optimizer, [p for m in ctx.head for p in m.parameters()]
        head_ids = {id(p) for p in self.head}
        self.backbone = [p for p in model.parameters() if id(p) not in head_ids]

    def on_epoch_end(self, epoch):
        self.before = {
            p: {k: v.clone() for k, v in self.opt.state[p].items()} for p in self.head + self.backbone
        }
        return {}

    def on_epoch_start(self, epoch):  # runs after RIFLE's (methods are called in order)
        if epoch == 1:
            self.seen = {
                "head": [dict(self.opt.state.get(p, {})) for p in self.head],
                "backbone_kept": all(
                    set(self.opt.state[p]) == {"exp_avg", "exp_avg_sq", "step"}
                    and all(torch.equal(self.opt.state[p][k], v) for k, v in self.before[p].items())
                    for p in self.backbone
                ),
                "head_before": [set(self.before[p]) for p in self.head],
            }
        return {}


@pytest.mark.parametrize("keep", [False, True])
def test_adamw_reinit_clears_the_heads_moments_and_keeps_the_backbones(tmp_path, keep):
    cfg = TrainConfig(
        **{**TINY, "lr": 1e-3},
        method="rifle",
        reinits=1,
        epochs=2,
        min_steps_after=0,
        opt="adamw",
        keep_optimizer_state=keep,
    ).validate()
    probe = StateProbe()
    trainer = make_trainer(tmp_path, build_methods(cfg) + [probe], opt="adamw", lr=1e-3)
    trainer.fit()
    assert trainer.history[1]["reinit"]
    assert probe.seen["head_before"] == [{"exp_avg", "exp_avg_sq", "step"}] * 2  # had moments
    assert probe.seen["backbone_kept"]
    if keep:
        assert all(s for s in probe.seen["head"])
    else:
        assert probe.seen["head"] == [{}, {}]  # exp_avg, exp_avg_sq and step all gone
        # ... and Adam restarted the head's count: one epoch of steps after the re-init, two for the backbone
        steps = trainer.steps_per_epoch
        assert float(trainer.optimizer.state[trainer.head[0].weight]["step"]) == steps
        assert float(trainer.optimizer.state[next(trainer.model.stem.parameters())]["step"]) == 2 * steps


@pytest.mark.parametrize("name", ["lamb", "adan"])
def test_reinit_restarts_a_per_group_step_count_like_a_fresh_optimizer(name):
    """timm's Lamb and Adan count steps per param group (bias correction): after a re-init the head's
    group steps exactly as a fresh optimizer would on the same weights and gradients."""
    from torch import nn
    from rifle import Rifle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    groups = [
        {"name": "backbone", "params": list(model[0].parameters())},
        {"name": "head", "params": list(model[2].parameters())},
    ]
    opt = build_optimizer(groups, opt=name, lr=0.01, momentum=0.9, weight_decay=0.0)
    rifle = Rifle(model, opt, epochs=4, reinits=1, head=model[2], seed=0, min_steps_after=0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def grads():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    epoch = 0
    while not rifle.on_epoch_start(epoch):
        for _ in range(3):
            grads()
            opt.step()
        epoch += 1
    assert float(opt.param_groups[0]["step"]) == 3 * epoch and "step" not in opt.param_groups[1]
    grads()
    fresh_head = [p.detach().clone().requires_grad_(True) for p in model[2].parameters()]
    for f, p in zip(fresh_head, model[2].parameters()):
        f.grad = p.grad.clone()
    fresh = build_optimizer([{"params": fresh_head}], opt=name, lr=0.01, momentum=0.9, weight_decay=0.0)
    opt.step()
    fresh.step()
    for f, p in zip(fresh_head, model[2].parameters()):
        assert torch.equal(f, p)


# ------------------------------------------------------------------------------------- the CLI
def test_cli_adamw_layer_decay_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
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
        "0.2",
        "--method",
        "rifle",
        "--reinits",
        "1",
        "--min-steps-after",
        "0",
        "--head-lr-restart",
        "--opt",
        "adamw",
        "--lr",
        "0.002",
        "--weight-decay",
        "0.05",
        "--opt-betas",
        "0.9",
        "0.99",
        "--opt-eps",
        "1e-7",
        "--layer-decay",
        "0.8",
        "--out",
        out,
    ]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0, stdout
    assert "layer decay 0.8: 5 layers" in stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["opt"], saved["opt_betas"], saved["opt_eps"], saved["layer_decay"]) == (
        "adamw",
        [0.9, 0.99],
        1e-7,
        0.8,
    )
    state = torch.load(out / "state.pt", weights_only=True)
    g = state["optimizer"]["param_groups"]
    assert [x["name"] for x in g][-1] == "head.layer4" and all(x["betas"] == (0.9, 0.99) for x in g)
    rows = metrics(out)
    # RIFLE's head-LR restart restarts the head group from its own (scaled) initial LR at the re-init
    assert rows[1]["lr_groups"]["head.layer4"] == pytest.approx(0.002)
    assert rows[1]["lr_groups"]["backbone.layer3"] == pytest.approx(
        0.002 * 0.8 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    # a resume with another optimizer is refused, naming the key
    code, _, err = run_cli(["train", "--resume", "--out", out, "--opt", "lamb"], capsys)
    assert code == 2 and "opt: 'adamw' -> 'lamb'" in err
