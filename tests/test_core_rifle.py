"""Re-init semantics (REFERENCE.md §3.4-3.9): in place, only the head, seeded, optimizer state."""

import copy
import warnings

import pytest
import torch
from torch import nn

from rifle import Rifle, find_head
from rifle.core.reinit import draw_values
from rifle.core.schedule import RifleScheduleWarning
from rifle.core.seeding import derive_seed


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def train_step(model, opt):
    x = torch.randn(5, 6)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_reinit_changes_head_only_in_place_and_clears_state():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt)
    head = model[2]
    w_obj, b_obj = head.weight, head.bias
    before = snapshot(model)
    rifle = Rifle(model, opt, epochs=4, reinits=1, seed=3, min_steps_after=None)
    assert rifle.reinit_epochs == [2]
    assert rifle.on_epoch_start(0) is False and rifle.on_epoch_start(1) is False
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert opt.state[head.weight]  # momentum exists
    assert rifle.on_epoch_start(2) is True
    after = snapshot(model)
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert not torch.equal(after["2.bias"], before["2.bias"])
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(
        after["0.bias"], before["0.bias"]
    )
    assert head.weight is w_obj and head.bias is b_obj  # in place: same Parameter objects
    assert head.weight not in opt.state and head.bias not in opt.state
    assert model[0].weight in opt.state  # backbone momentum untouched
    assert rifle.on_epoch_start(2) is False  # never twice


def test_keep_optimizer_state_option():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt)
    buf = opt.state[model[2].weight]["momentum_buffer"].clone()
    rifle = Rifle(model, opt, epochs=4, reinits=1, keep_optimizer_state=True, min_steps_after=None)
    rifle.on_epoch_start(2)
    assert torch.equal(opt.state[model[2].weight]["momentum_buffer"], buf)


class Custom(nn.Module):
    """A module the core does not know: its own reset_parameters() draws from torch's global RNG."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(4))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.scale.copy_(torch.rand(4) + torch.randn(4))


def zoo():
    torch.manual_seed(11)
    return [
        nn.Linear(8, 3),
        nn.Linear(5, 2, bias=False),
        nn.Conv2d(3, 4, 3),
        nn.Conv1d(2, 3, 5),
        nn.ConvTranspose2d(4, 2, 3),
        nn.BatchNorm2d(4),
        nn.LayerNorm(6),
        nn.GroupNorm(2, 4),
        nn.Embedding(7, 3, padding_idx=1),
        Custom(),
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), Custom(), nn.Linear(4, 2)),
    ]


def reset_under_manual_seed(module, seed, index):
    """What the default init must draw: reset_parameters() after torch.manual_seed(derived seed)."""
    expected = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "reinit", index))
        for sub in expected.modules():
            if callable(getattr(sub, "reset_parameters", None)) and any(
                True for _ in sub.parameters(recurse=False)
            ):
                sub.reset_parameters()
    return [p.detach() for p in expected.parameters()]


@pytest.mark.parametrize("k", range(len(zoo())))
def test_default_init_is_exactly_reset_parameters_under_the_derived_seed(k):
    module = zoo()[k]
    got = draw_values([module], seed=5, index=1)[0]
    want = reset_under_manual_seed(module, 5, 1)
    assert len(got) == len(want)
    assert all(torch.equal(g, w) for g, w in zip(got, want)), type(module).__name__
    # several modules share one stream, in order (a head made of two modules)
    a, b = zoo()[0], zoo()[2]
    both = draw_values([a, b], seed=5, index=2)
    seq = reset_under_manual_seed(nn.Sequential(a, b), 5, 2)
    assert all(torch.equal(g, w) for g, w in zip(both[0] + both[1], seq))


def test_named_initialisers_draw_from_the_derived_seed():
    # lecun_normal is what "kaiming_normal" drew before it was renamed (the ELPV kaiming_normal row)
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    w = torch.empty(4, 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(3, "reinit", 2))
        nn.init.kaiming_normal_(w, nonlinearity="linear")
    got_w, got_b = draw_values([lin], seed=3, index=2, init="lecun_normal")[0]
    assert torch.equal(got_w, w) and torch.equal(got_b, torch.zeros(4))


def test_same_seed_same_head_different_index_different_head():
    a, b = net(0), net(1)  # different current weights do not matter
    Rifle(a, None, epochs=4, reinits=1, seed=7).reinit(1)
    Rifle(b, None, epochs=4, reinits=1, seed=7).reinit(1)
    assert torch.equal(a[2].weight, b[2].weight) and torch.equal(a[2].bias, b[2].bias)
    c = net(0)
    Rifle(c, None, epochs=4, reinits=1, seed=7).reinit(2)
    assert not torch.equal(a[2].weight, c[2].weight)
    d = net(0)
    Rifle(d, None, epochs=4, reinits=1, seed=8).reinit(1)
    assert not torch.equal(a[2].weight, d[2].weight)


class SeedSpy:
    """Records every call of the global seeding functions (a re-init must call none of them)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for mod, name in (
            (torch, "manual_seed"),
            (torch.random, "manual_seed"),
            (torch, "seed"),
            (torch.cuda, "manual_seed"),
            (torch.cuda, "manual_seed_all"),
            (torch.cuda, "seed"),
            (torch.cuda, "seed_all"),
            (torch.cuda, "set_rng_state"),
            (torch.cuda, "set_rng_state_all"),
        ):
            monkeypatch.setattr(mod, name, self._spy(f"{mod.__name__}.{name}"))

    def _spy(self, name):
        def spy(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"a re-init called {name}")

        return spy


@pytest.mark.parametrize(
    "init", ["default", "lecun_normal", "kaiming_normal", "xavier_uniform", "normal", "callable"]
)
def test_reinit_leaves_every_global_rng_alone(monkeypatch, init):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Custom(), nn.Flatten(), nn.Linear(4, 3))
    if init == "callable":
        init = lambda m: [nn.init.normal_(p) for p in m.parameters()]  # noqa: E731 - uses the global RNG
    torch.manual_seed(123)
    state = torch.get_rng_state()
    spy = SeedSpy(monkeypatch)
    r = Rifle(model, None, epochs=4, reinits=1, head=[model[0], model[1], model[2], model[4]], init=init)
    r.reinit(1)
    assert spy.calls == []
    assert torch.equal(torch.get_rng_state(), state)  # the CPU generator, untouched


def test_reinit_never_deep_copies_what_a_hook_is_bound_to():
    class Owner:  # stands for the Trainer: its bound method is a forward pre-hook on the head
        seen = 0

        def __deepcopy__(self, memo):
            raise AssertionError("the re-init deep-copied the object a hook is bound to")

        def capture(self, module, args):
            self.seen += 1

    model = net()
    owner = Owner()
    model[2].register_forward_pre_hook(owner.capture)
    model[2].big = torch.zeros(3)  # a plain tensor attribute is copied, never shared with the copy
    before = model[2].weight.clone()
    Rifle(model, None, epochs=4, reinits=1, seed=2).reinit(1)
    assert not torch.equal(before, model[2].weight)
    assert torch.equal(model[2].weight, draw_values([net()[2]], seed=2, index=1)[0][0])
    model(torch.randn(2, 6))
    assert owner.seen == 1  # the hook still sits on the real head


def test_reinit_modules_resets_batchnorm_running_stats():
    from rifle.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 5)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16) * 3 + 1)
    bns = [m for m in model.blocks[2].modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(
        int(b.num_batches_tracked) == 3 and not torch.equal(b.running_var, torch.ones_like(b.running_var))
        for b in bns
    )
    objs = [(b.running_mean, b.running_var, b.num_batches_tracked) for b in bns]
    other = [m for m in model.blocks[1].modules() if isinstance(m, nn.BatchNorm2d)][0]
    other_var = other.running_var.clone()
    Rifle(model, None, epochs=4, reinits=1, modules="last:1", min_steps_after=None).reinit(1)
    for b, (mean, var, n) in zip(bns, objs):
        assert torch.equal(b.running_mean, torch.zeros_like(b.running_mean))
        assert torch.equal(b.running_var, torch.ones_like(b.running_var))
        assert int(b.num_batches_tracked) == 0
        assert b.running_mean is mean and b.running_var is var and b.num_batches_tracked is n  # in place
    assert torch.equal(other.running_var, other_var)  # blocks below keep their statistics


def test_state_dict_resume_never_repeats_or_skips():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r1 = Rifle(model, opt, epochs=40, reinits=3, seed=1)
    fired = [e for e in range(15) if r1.on_epoch_start(e)]
    assert fired == [10]
    state = copy.deepcopy(r1.state_dict())
    head_after_first = model[2].weight.clone()
    r2 = Rifle(model, opt, epochs=40, reinits=3, seed=1)
    r2.load_state_dict(state)
    fired2 = [e for e in range(15, 40) if r2.on_epoch_start(e)]
    assert fired2 == [20, 30]
    assert r2.state_dict()["done"] == [1, 2, 3]
    # an uninterrupted run draws exactly the same heads
    other = net()
    r3 = Rifle(other, None, epochs=40, reinits=3, seed=1)
    for e in range(11):
        r3.on_epoch_start(e)
    assert torch.equal(other[2].weight, head_after_first)


def test_load_state_for_other_schedule_is_refused():
    model = net()
    r = Rifle(model, None, epochs=40, reinits=3)
    with pytest.raises(ValueError, match="different schedule"):
        Rifle(model, None, epochs=40, reinits=2).load_state_dict(r.state_dict())


def test_skipped_point_warns():
    r = Rifle(net(), None, epochs=40, reinits=3)
    with pytest.warns(RifleScheduleWarning, match="not applied"):
        r.on_epoch_start(11)


def test_step_granularity():
    model = net()
    r = Rifle(model, None, total_steps=300, reinits=2, min_steps_after=None)
    assert r.reinit_steps == [100, 200]
    fired = [s for s in range(300) if r.on_step_start(s)]
    assert fired == [100, 200]
    with pytest.raises(RuntimeError):
        r.on_epoch_start(0)
    with pytest.raises(ValueError, match="exactly one"):
        Rifle(model, None, reinits=1)


def test_step_budget_warning_and_guard_steps():
    with pytest.warns(RifleScheduleWarning, match="min_steps_after"):
        Rifle(net(), None, epochs=12, reinits=2, steps_per_epoch=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Rifle(net(), None, epochs=12, reinits=2, steps_per_epoch=10, min_steps_after=30)
    # guard of 50 steps at 10 steps/epoch = 5 epochs: of [4, 8] only 4 survives (8 leaves 4 epochs)
    with pytest.warns(RifleScheduleWarning, match="dropped"):
        r = Rifle(net(), None, epochs=12, reinits=2, steps_per_epoch=10, guard_steps=50, min_steps_after=None)
    assert r.reinit_epochs == [4]


def test_head_lr_restart_follows_cosine_per_period():
    model = net()
    head_params = list(model[2].parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head_params)]
    opt = torch.optim.SGD([{"params": rest}, {"params": head_params}], lr=0.1)
    r = Rifle(model, opt, epochs=8, reinits=1, head_lr_restart=True, min_steps_after=None)
    lrs = []
    for e in range(8):
        r.on_epoch_start(e)
        lrs.append(opt.param_groups[1]["lr"])
    import math

    expect = [0.1 * 0.5 * (1 + math.cos(math.pi * (e % 4) / 4)) for e in range(8)]
    assert lrs == pytest.approx(expect)
    assert opt.param_groups[0]["lr"] == 0.1
    mixed = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="own optimizer"):
        Rifle(model, mixed, epochs=8, reinits=1, head_lr_restart=True)


@pytest.mark.parametrize(
    "init,w_std,b_std",
    [
        # a 512 -> 1000 Linear: fan_in 512, fan_out 1000
        ("default", 1 / (3 * 512) ** 0.5, 1 / (3 * 512) ** 0.5),  # U(+-1/sqrt(fan_in)): weight and bias
        ("lecun_normal", 1 / 512**0.5, 0.0),  # N(0, 1/fan_in)
        ("kaiming_normal", (2 / 512) ** 0.5, 0.0),  # He: N(0, 2/fan_in)
        ("xavier_uniform", (2 / (512 + 1000)) ** 0.5, 0.0),  # U(+-sqrt(6/(fan_in+fan_out)))
        ("normal", 0.01, 0.0),
    ],
)
def test_initialiser_std_matches_its_formula(init, w_std, b_std):
    lin = nn.Linear(512, 1000)
    Rifle(nn.Sequential(lin), None, epochs=4, reinits=1, init=init).reinit(1)
    assert float(lin.weight.detach().std()) == pytest.approx(w_std, rel=0.02)
    assert abs(float(lin.weight.detach().mean())) < 0.01 * w_std
    if b_std:
        assert float(lin.bias.detach().std()) == pytest.approx(b_std, rel=0.1)
    else:
        assert torch.equal(lin.bias, torch.zeros(1000))


def test_unknown_init_and_old_kaiming_normal_state():
    with pytest.raises(ValueError, match="unknown init.*lecun_normal"):
        Rifle(net(), None, epochs=4, reinits=1, init="bogus")
    # a run saved before kaiming_normal meant He's gain drew LeCun's: resuming it would switch heads
    old = {
        "version": 1,
        "unit": "epoch",
        "total": 40,
        "reinits": 3,
        "points": [10, 20, 30],
        "done": [1],
        "seed": 0,
    }
    with pytest.raises(ValueError, match="lecun_normal"):
        Rifle(net(), None, epochs=40, reinits=3, init="kaiming_normal").load_state_dict(old)
    r = Rifle(net(), None, epochs=40, reinits=3, init="lecun_normal")
    r.load_state_dict(old)  # the same draws: resumes
    assert r.applied == [1]
    finished = dict(old, done=[1, 2, 3])  # nothing left to draw: nothing changes
    Rifle(net(), None, epochs=40, reinits=3, init="kaiming_normal").load_state_dict(finished)
    new = Rifle(net(), None, epochs=40, reinits=3, init="kaiming_normal").state_dict()
    with pytest.raises(ValueError, match="init"):
        Rifle(net(), None, epochs=40, reinits=3, init="lecun_normal").load_state_dict(new)


def test_explicit_heads():
    model = net()
    assert find_head(model) == [model[2]]
    assert find_head(model, "0") == [model[0]]
    assert find_head(model, model[0]) == [model[0]]
    assert find_head(model, ["0", "2"]) == [model[0], model[2]]


@pytest.mark.parametrize("wrap", ["DataParallel", "compile", "compile(DataParallel)"])
def test_works_through_real_wrappers(wrap):
    model = net()
    if wrap == "DataParallel":
        wrapped = nn.DataParallel(model)  # CPU only: forwards to .module
    elif wrap == "compile":
        wrapped = torch.compile(model, backend="eager")
        assert wrapped._orig_mod is model
    else:
        wrapped = torch.compile(nn.DataParallel(model), backend="eager")
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 6)
    loss = wrapped(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    w = model[2].weight
    r = Rifle(wrapped, opt, epochs=4, reinits=1, seed=4, min_steps_after=None)
    assert r.module_names == ["2"] and r.head_modules == [model[2]]
    assert r.on_epoch_start(2) is True
    assert model[2].weight is w and torch.equal(w, draw_values([net()[2]], seed=4, index=1)[0][0])
    assert w not in opt.state and model[0].weight in opt.state
    with torch.no_grad():  # the wrapper's forward sees the new head
        assert torch.allclose(wrapped(x), model(x))


def test_reinit_beyond_the_fc_layer():
    from rifle.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 16, 16)
    model(x).sum().backward()
    opt.step()
    before = snapshot(model)
    r = Rifle(model, opt, epochs=4, reinits=1, modules="last:1", min_steps_after=None)
    assert r.module_names == ["fc", "blocks.2"]
    r.on_epoch_start(2)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "") for k in changed} == {
        "fc",
        "blocks.2",
    }
    assert any(k.startswith("blocks.2.") and k.endswith("weight") for k in changed)
    assert not any(k.startswith(("stem", "blocks.0", "blocks.1")) for k in changed)
    assert all(p not in opt.state for p in model.blocks[2].parameters())
    assert all(p in opt.state for p in model.blocks[1].parameters())
    # a regular expression selects the same block
    assert Rifle(model, None, epochs=4, reinits=1, modules=r"blocks\.2").module_names == ["fc", "blocks.2"]
    with pytest.raises(ValueError, match="matches no module"):
        Rifle(model, None, epochs=4, reinits=1, modules="nothing.*")
    with pytest.raises(ValueError, match="N must be in 1..3"):
        Rifle(model, None, epochs=4, reinits=1, modules="last:9")


def test_last_blocks_on_real_backbones():
    import timm
    from rifle.core.structure import select_modules

    eff = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)
    assert select_modules(eff, "last:1") == [eff.blocks[-1][-1]]
    import torchvision

    res = torchvision.models.resnet18(weights=None)
    assert select_modules(res, "last:2") == [res.layer4[0], res.layer4[1]]


def test_head_lr_restart_survives_optimizer_state_restore():
    import math

    model = net()
    head = list(model[2].parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    opt = torch.optim.SGD([{"params": rest}, {"params": head}], lr=0.1)
    r = Rifle(model, opt, epochs=8, reinits=1, head_lr_restart=True, min_steps_after=None)
    for e in range(2):
        r.on_epoch_start(e)
    saved_opt, saved_r = copy.deepcopy(opt.state_dict()), r.state_dict()
    # a resumed process: fresh optimizer (same base LR), state restored after Rifle is built
    opt2 = torch.optim.SGD([{"params": rest}, {"params": head}], lr=0.1)
    r2 = Rifle(model, opt2, epochs=8, reinits=1, head_lr_restart=True, min_steps_after=None)
    opt2.load_state_dict(saved_opt)
    r2.load_state_dict(saved_r)
    r2.on_epoch_start(2)
    assert opt2.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))


@pytest.mark.parametrize(
    "unit,bad", [("epoch", -1), ("epoch", 40), ("epoch", 41), ("step", 300), ("step", -1)]
)
def test_unit_outside_the_run_is_an_error(unit, bad):
    kw = dict(epochs=40) if unit == "epoch" else dict(total_steps=300, min_steps_after=None)
    r = Rifle(net(), None, reinits=3, **kw)
    hook = r.on_epoch_start if unit == "epoch" else r.on_step_start
    with pytest.raises(ValueError, match=rf"0-based.*\[0, {r.schedule.total}\)"):
        hook(bad)
    assert r.applied == [] and r.skipped == []


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_one_based_loop_is_caught_before_it_shifts_a_reinit(unit):
    kw = dict(epochs=4) if unit == "epoch" else dict(total_steps=4)
    r = Rifle(net(), None, reinits=1, min_steps_after=None, **kw)
    hook = r.on_epoch_start if unit == "epoch" else r.on_step_start
    with pytest.warns(RifleScheduleWarning) as caught:
        hook(1)  # the first call: warned at once, before the shifted re-init at the loop's 2nd unit
    assert [str(w.message) for w in caught] == [
        f"RIFLE: the first call is on_{unit}_start(1): {unit}s are 0-based, in [0, 4); a loop over "
        f"range(1, 5) shifts every re-init by one {unit} and fails at its last {unit}. Call "
        f"on_{unit}_start(0) first (or load_state_dict() before resuming at {unit} 1)"
    ]
    assert caught[0].filename == __file__  # the user's line
    with pytest.raises(ValueError, match="range\\(1, E\\+1\\)"):
        for t in range(2, 5):
            hook(t)
    assert r.applied == [1]  # the out-of-range last one still raises
    start = lambda r, t: (r.on_epoch_start if unit == "epoch" else r.on_step_start)(t)  # noqa: E731
    with warnings.catch_warnings():  # a 0-based loop, or a resumed one starting at 1: no warning
        warnings.simplefilter("error")
        start(Rifle(net(), None, reinits=1, min_steps_after=None, **kw), 0)
        resumed = Rifle(net(), None, reinits=1, min_steps_after=None, **kw)
        resumed.load_state_dict(Rifle(net(), None, reinits=1, min_steps_after=None, **kw).state_dict())
        start(resumed, 1)


def test_optimizer_without_the_head_is_refused_at_construction():
    model = net()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the backbone only: the head never trains
    with pytest.raises(ValueError) as e:
        Rifle(model, opt, epochs=4, reinits=1)
    assert str(e.value) == (
        "the optimizer does not hold 2.weight, 2.bias (parameters of 2, which RIFLE re-initialises): the "
        "re-initialised head would never be trained. Build the optimizer over the model's parameters after "
        "replacing its head, or pass the optimizer that trains the head (or optimizer=None)"
    )
    model[2].bias.requires_grad_(False)  # a frozen parameter needs no optimizer
    with pytest.raises(ValueError, match="does not hold 2.weight \\(parameters of 2,"):
        Rifle(model, opt, epochs=4, reinits=1)
    Rifle(
        model, torch.optim.SGD([model[0].weight, model[0].bias, model[2].weight], lr=0.1), epochs=4, reinits=1
    )
    Rifle(model, None, epochs=4, reinits=1)


@pytest.mark.parametrize("when", ["before the loop", "during training"])
def test_head_replaced_after_rifle_is_refused_before_a_silent_reinit(when):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = Rifle(model, opt, epochs=4, reinits=1, min_steps_after=None)  # the re-init at epoch 2
    old = model[2]
    if when == "during training":
        r.on_epoch_start(0)
        r.on_epoch_start(1)
    model[2] = nn.Linear(8, 3)  # replaced: the Rifle still holds the detached old module
    with pytest.raises(RuntimeError) as e:
        r.on_epoch_start(0 if when == "before the loop" else 2)
    where = "the first on_epoch_start" if when == "before the loop" else "re-init 1"
    assert str(e.value) == (
        f"RIFLE {where}: 2 is no longer part of the model (replaced after Rifle(...) was built?): "
        f"re-initialising it would change nothing the model uses. Build Rifle (and the optimizer) after "
        f"the model's head is in place"
    )
    assert r.applied == [] and r.head_modules == [old]


def test_optimizer_rebuilt_without_the_head_is_refused_at_the_reinit():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = Rifle(model, opt, epochs=4, reinits=1, min_steps_after=None)
    r.on_epoch_start(0)
    r.on_epoch_start(1)
    opt.param_groups[:] = [g for g in opt.param_groups if False] + [
        {**opt.param_groups[0], "params": list(model[0].parameters())}
    ]
    with pytest.raises(RuntimeError, match="^RIFLE re-init 1: the optimizer does not hold 2.weight, 2.bias"):
        r.on_epoch_start(2)
    assert r.applied == []


def test_applied_and_skipped_are_separate_and_old_state_loads():
    r = Rifle(net(), None, epochs=40, reinits=3)
    with pytest.warns(RifleScheduleWarning, match="not applied"):
        r.on_epoch_start(11)
    assert r.skipped == [1] and r.applied == []
    r.on_epoch_start(20)
    assert r.applied == [2] and r.skipped == [1] and r.done == [1, 2]
    state = r.state_dict()
    assert state["applied"] == [2] and state["skipped"] == [1] and state["done"] == [1, 2]
    r2 = Rifle(net(), None, epochs=40, reinits=3)
    r2.load_state_dict(state)
    assert r2.applied == [2] and r2.skipped == [1]
    old = {
        "version": 1,
        "unit": "epoch",
        "total": 40,
        "reinits": 3,
        "points": [10, 20, 30],
        "done": [1, 2],
        "seed": 0,
    }  # saved before applied/skipped existed
    r3 = Rifle(net(), None, epochs=40, reinits=3)
    r3.load_state_dict(old)
    assert r3.applied == [1, 2] and r3.skipped == [] and r3.done == [1, 2]
    assert [e for e in range(21, 40) if r3.on_epoch_start(e)] == [30]


def test_reinit_twice_records_once():
    r = Rifle(net(), None, epochs=4, reinits=1, min_steps_after=None)
    r.reinit(1)
    r.reinit(1)
    assert r.applied == [1] and r.state_dict()["done"] == [1]


def test_reinit_parameters_is_not_named_like_module_parameters():
    model = net()
    r = Rifle(model, None, epochs=4, reinits=1)
    assert r.reinit_parameters == [model[2].weight, model[2].bias]
    assert not hasattr(r, "parameters") and not hasattr(r, "_base_lrs")


def test_warnings_point_at_the_callers_line():
    def caught(fn):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fn()
        rifle_warnings = [x for x in w if issubclass(x.category, RifleScheduleWarning)]
        assert rifle_warnings, "no warning"
        return [x.filename for x in rifle_warnings]

    r = Rifle(net(), None, epochs=40, reinits=3)
    assert caught(lambda: r.on_epoch_start(11)) == [__file__]
    assert caught(lambda: Rifle(net(), None, epochs=12, reinits=2, steps_per_epoch=10)) == [__file__]
    assert caught(lambda: Rifle(net(), None, epochs=40, reinits=3, guard=11)) == [__file__]


def test_docs_api_example_runs(capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "rifle.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert blocks
    exec(compile("\n".join(blocks), str(doc), "exec"), {})
    assert capsys.readouterr().out.split("\n")[:3] == ["[10, 20, 30]", "[1, 2, 3] []", "2"]
