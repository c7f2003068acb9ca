"""Re-init semantics (REFERENCE.md §3.4-3.9): in place, only the head, seeded, optimizer state."""
import copy
import warnings

import pytest
import torch
from torch import nn

from rifle import Rifle, find_head
from rifle.core.reinit import draw_values
from rifle.core.schedule import RifleScheduleWarning


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
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
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


def test_default_init_matches_reset_parameters_distribution():
    # the new head is what nn.Linear's own reset_parameters() draws with the derived seed
    model = net()
    vals = draw_values([model[2]], seed=5, index=1)
    bound = 1 / 8 ** 0.5
    assert vals[0][0].abs().max() <= bound and vals[0][1].abs().max() <= bound


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


def test_reinit_does_not_touch_global_rng():
    model = net()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Rifle(model, None, epochs=4, reinits=1).reinit(1)
    assert torch.equal(torch.rand(3), expected)


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
        r = Rifle(net(), None, epochs=12, reinits=2, steps_per_epoch=10, guard_steps=50,
                  min_steps_after=None)
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


def test_all_initializers_and_unknown():
    for init in ("default", "kaiming_normal", "xavier_uniform", "normal"):
        m = net()
        before = m[2].weight.clone()
        Rifle(m, None, epochs=4, reinits=1, init=init).reinit(1)
        assert not torch.equal(before, m[2].weight)
    with pytest.raises(ValueError, match="unknown init"):
        Rifle(net(), None, epochs=4, reinits=1, init="bogus")


def test_works_through_ddp_like_wrappers_and_explicit_heads():
    model = net()
    assert find_head(model) == [model[2]]
    assert find_head(model, "0") == [model[0]]
    assert find_head(model, model[0]) == [model[0]]
    assert find_head(model, ["0", "2"]) == [model[0], model[2]]


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
    assert {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "") for k in changed} \
        == {"fc", "blocks.2"}
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
    from rifle.core.heads import select_modules
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
