"""trigger="converged": re-init once the previous epoch's train accuracy reaches a threshold
(docs/rifle.md#trigger): hand-fed accuracies, exact resume, 2 gloo ranks, the CLI end to end."""

import copy
import json

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import killed_at_epoch, leave_group, metrics, run_cli
from rifle import Rifle
from rifle.config import ConfigError, TrainConfig
from rifle.core.reinit import reinit_


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))


def feed(rifle, accs, start=0, n=100):
    """One observe per epoch (two batches, to exercise the sum): ``acc * n`` correct of ``n``.
    Returns the epochs at which on_epoch_start re-initialised."""
    fired = []
    for e, a in enumerate(accs, start=start):
        if rifle.on_epoch_start(e):
            fired.append(e)
        hits = round(a * n)
        rifle.observe(torch.tensor(0.5), correct=torch.tensor(hits // 2), count=n // 2)
        rifle.observe(0.5, correct=hits - hits // 2, count=n - n // 2)
    rifle.settle_trigger()
    return fired


def test_no_reinit_before_the_threshold_then_at_the_first_epoch_after_one_reaching_it():
    model = tiny()
    rifle = Rifle(model, None, epochs=20, reinits=1, trigger="converged", seed=3)
    head = model[2]
    accs = [0.5, 0.8, 0.96, 0.97, 0.99] + [0.99] * 15
    for e, a in enumerate(accs):
        before = head.weight.detach().clone()
        fired = rifle.on_epoch_start(e)
        changed = not torch.equal(before, head.weight)
        assert fired == changed == (e == 4), e  # epoch 3 reached 0.97 (>=): re-init at the start of 4
        if e == 4:  # the same draw as the schedule's re-init 1 with this seed
            expect = copy.deepcopy(head)
            reinit_([expect], 3, 1, "default")
            assert torch.equal(head.weight, expect.weight) and torch.equal(head.bias, expect.bias)
        rifle.observe(0.3, correct=a * 100, count=100)
    assert rifle.fired == rifle.points == rifle.reinit_epochs == [4] and rifle.applied == [1]
    rifle.settle_trigger()
    rep = rifle.trigger_report
    assert rep["fired"] == [4] and rep["reason"] is None and rep["converged_acc"] == 0.97
    assert [a for _, a in rep["train_acc"]] == pytest.approx(accs)
    rifle.close_diagnosis()  # the entry stays open without optimizer steps after the re-init
    assert rifle.diagnosis[0]["at"] == 4 and rifle.diagnosis[0]["train_acc_before"] == pytest.approx(0.97)


def test_not_again_until_the_new_head_reconverged_and_at_most_k():
    rifle = Rifle(tiny(), None, epochs=40, reinits=3, trigger="converged")
    # 0: converged -> re-init at 1; 1 is the re-init epoch (does not count, even at 0.99);
    # 2: 0.5 -> nothing at 3; 3: converged again -> re-init at 4; 5 -> re-init at 6; K = 3 reached
    accs = [0.98, 0.99, 0.5, 0.98, 0.98, 0.98] + [0.99] * 34
    assert feed(rifle, accs) == [1, 4, 6] == rifle.fired
    assert rifle.trigger_report["reason"] is None
    # the re-init epoch alone never qualifies: converged at 0, 1, 2, ... fires every other epoch
    rifle = Rifle(tiny(), None, epochs=40, reinits=5, trigger="converged")
    assert feed(rifle, [0.99] * 40) == [1, 3, 5, 7, 9]


@pytest.mark.parametrize(
    "guard,first_converged,expected",
    [
        (None, 8, []),  # E=10: default guard ceil(10/8)=2, last start 8; converged at 8 -> 9: too late
        (None, 7, [8]),  # ... converged at 7 -> start 8 leaves 2 epochs: allowed
        (4, 6, []),  # guard 4: last start 6; converged at 6 -> 7 leaves 3 < 4
        (4, 5, [6]),
    ],
)
def test_never_inside_the_guard(guard, first_converged, expected):
    rifle = Rifle(tiny(), None, epochs=10, reinits=2, guard=guard, trigger="converged")
    accs = [0.5] * first_converged + [0.99] * (10 - first_converged)
    assert feed(rifle, accs) == expected
    reason = rifle.trigger_report["reason"]
    g = 2 if guard is None else guard
    if not expected:
        assert reason == (
            f"train accuracy reached 0.97 at epoch {first_converged}; a re-init after it "
            f"would leave fewer than guard={g} epochs (the last allowed start is epoch {10 - g})"
        )
    else:  # K=2, one fired: the second could not (the new head's epochs are too late)
        assert reason.startswith("1 of 2 re-init(s): train accuracy reached 0.97 at epoch")


def test_never_converged_means_no_reinit_and_says_why():
    model = tiny()
    w = model[2].weight.detach().clone()
    rifle = Rifle(model, None, epochs=10, reinits=3, trigger="converged")
    accs = [0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.83, 0.83, 0.82]
    assert feed(rifle, accs) == [] and torch.equal(model[2].weight, w)
    assert rifle.trigger_report["fired"] == [] and rifle.applied == []
    assert rifle.trigger_report["reason"] == "train accuracy never reached 0.97 (best 0.83 at epoch 7)"
    # no accuracy fed (loss only): no re-init, and the reason says so
    rifle = Rifle(tiny(), None, epochs=10, reinits=1, trigger="converged")
    for e in range(10):
        assert not rifle.on_epoch_start(e)
        rifle.observe(0.01)
    rifle.settle_trigger()
    assert rifle.trigger_report["reason"].startswith("no training accuracy was observed")


def test_threshold_and_bad_settings():
    rifle = Rifle(tiny(), None, epochs=10, reinits=1, trigger="converged", converged_acc=0.5)
    assert feed(rifle, [0.49, 0.5] + [0.1] * 8) == [2]
    with pytest.raises(ValueError, match="step granularity is not supported"):
        Rifle(tiny(), None, total_steps=100, reinits=1, trigger="converged")
    with pytest.raises(ValueError, match="head_lr_restart"):
        Rifle(
            tiny(),
            torch.optim.SGD(tiny().parameters(), lr=0.1),
            epochs=10,
            trigger="converged",
            head_lr_restart=True,
        )
    with pytest.raises(ValueError, match="only with trigger='converged'"):
        Rifle(tiny(), None, epochs=10, converged_acc=0.9)
    with pytest.raises(ValueError, match=r"converged_acc=1.5: a training accuracy in \(0, 1\]"):
        Rifle(tiny(), None, epochs=10, trigger="converged", converged_acc=1.5)
    with pytest.raises(ValueError, match="trigger='sometimes'"):
        Rifle(tiny(), None, epochs=10, trigger="sometimes")
    with pytest.raises(ConfigError, match="--reinit-converged-acc=0.9: applies only with --reinit-trigger"):
        TrainConfig(method="rifle", reinit_converged_acc=0.9).validate()
    with pytest.raises(ConfigError, match="--reinit-trigger='converged': converged decides once per epoch"):
        TrainConfig(method="rifle", reinit_trigger="converged", reinit_granularity="step").validate()
    with pytest.raises(ConfigError, match="--reinit-trigger='often'"):
        TrainConfig(method="rifle", reinit_trigger="often").validate()


def test_schedule_default_is_unchanged():
    rifle = Rifle(tiny(), None, epochs=40, reinits=3)
    assert rifle.trigger == "schedule" and rifle.trigger_report is None and rifle.points == [10, 20, 30]
    assert not {"trigger", "fired", "trigger_history", "trigger_window"} & set(rifle.state_dict())
    conv = Rifle(tiny(), None, epochs=40, reinits=3, trigger="converged")
    with pytest.raises(ValueError, match="saved with trigger='schedule', this run has trigger='converged'"):
        conv.load_state_dict(rifle.state_dict())
    with pytest.raises(ValueError, match="saved with trigger='converged', this run has trigger='schedule'"):
        rifle.load_state_dict(conv.state_dict())
    other = Rifle(tiny(), None, epochs=40, reinits=3, trigger="converged", converged_acc=0.9)
    with pytest.raises(ValueError, match="converged_acc"):
        other.load_state_dict(conv.state_dict())


@pytest.mark.parametrize("settled", [True, False])
@pytest.mark.parametrize("stop", [1, 3, 4, 5, 6])
def test_state_dict_resumes_exactly(stop, settled):
    """Stop after epoch ``stop - 1`` (the checkpoint), rebuild from the state, continue: the same
    re-inits, heads and report as the uninterrupted run (also with the window not yet settled)."""
    accs = [0.9, 0.98, 0.99, 0.98, 0.4, 0.98, 0.99, 0.99] + [0.5] * 12
    full_model = tiny()
    full = Rifle(full_model, None, epochs=20, reinits=3, trigger="converged", seed=1)
    assert feed(full, accs) == [2, 4, 6]

    model = tiny()
    first = Rifle(model, None, epochs=20, reinits=3, trigger="converged", seed=1)
    for e in range(stop):
        first.on_epoch_start(e)
        first.observe(0.5, correct=round(accs[e] * 100), count=100)
    if settled:
        first.settle_trigger()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it (plain values)
    weights = copy.deepcopy(model.state_dict())

    model2 = tiny()
    model2.load_state_dict(weights)
    second = Rifle(model2, None, epochs=20, reinits=3, trigger="converged", seed=1)
    second.load_state_dict(state)
    feed(second, accs[stop:], start=stop)
    assert second.fired == full.fired and second.applied == full.applied
    assert second.trigger_report == full.trigger_report
    for a, b in zip(model2.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


def test_resume_with_another_init_is_refused_while_a_reinit_may_still_fire():
    """As for the schedule's pending re-inits: the re-inits the trigger may still fire would draw other
    heads. Once K fired (or none may fire any more) a changed init changes nothing and is accepted."""
    first = Rifle(tiny(), None, epochs=10, reinits=2, trigger="converged", init="shrink-perturb")
    feed(first, [0.99, 0.5, 0.5])  # fired at 1; one more may fire
    state = json.loads(json.dumps(first.state_dict()))
    assert first.fired == [1] and state["init"] == "shrink_perturb:0.4,0.1"
    other = Rifle(tiny(), None, epochs=10, reinits=2, trigger="converged", init="lecun_normal")
    with pytest.raises(ValueError) as e:
        other.load_state_dict(state)
    assert str(e.value) == (
        "RIFLE state was saved with init='shrink_perturb:0.4,0.1', this run has "
        "init='lecun_normal': the remaining re-inits would draw other heads"
    )
    same = Rifle(tiny(), None, epochs=10, reinits=2, trigger="converged", init="shrink_perturb:0.4,0.1")
    same.load_state_dict(state)  # the same init, spelled out: accepted
    feed(first, [0.99, 0.5], start=3)  # the second fired at 4: K reached
    done = Rifle(tiny(), None, epochs=10, reinits=2, trigger="converged", init="lecun_normal")
    done.load_state_dict(first.state_dict())
    assert done.fired == [1, 4]
    late = Rifle(tiny(), None, epochs=10, reinits=2, trigger="converged", init="shrink-perturb")
    feed(late, [0.5] * 9)  # epoch 8 ended: the guard (2) leaves no epoch to fire at
    Rifle(tiny(), None, epochs=10, reinits=2, trigger="converged").load_state_dict(late.state_dict())


# ---------------------------------------------------------------------------- DDP
def _ddp_worker(rank, port, out):
    import torch.distributed as dist
    from test_ddp import _env

    _env(rank, 2, port)
    dist.init_process_group("gloo")
    model = tiny()
    rifle = Rifle(model, None, epochs=10, reinits=2, trigger="converged", converged_acc=0.9)
    # per rank and epoch: correct of 100. Epoch 0: rank 0 alone is above 0.9, the sum (0.85) is not;
    # epoch 1: rank 1 alone is below, the sum (0.91) is above -> re-init at 2 on both ranks;
    # epoch 3: rank 0 below (0.5), rank 1 at 1.0 -> 0.75: nothing at 4; epoch 4: 0.9 -> re-init at 5
    local = {0: [100, 100, 0, 50, 90, 0, 0, 0, 0, 0], 1: [70, 82, 0, 100, 90, 0, 0, 0, 0, 0]}[rank]
    fired = []
    for e in range(10):
        if rifle.on_epoch_start(e):
            fired.append(e)
        rifle.observe(torch.tensor(0.3), correct=torch.tensor(local[e]), count=100)
        rifle.settle_trigger()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"fired": fired, "report": rifle.trigger_report, "head": model[2].weight.tolist()}, f)
    leave_group()


def test_ddp_ranks_decide_identically_from_the_summed_accuracy(tmp_path):
    from test_ddp import free_port

    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["fired"] == [2, 5]
    assert [a for _, a in r0["report"]["train_acc"]][:5] == pytest.approx([0.85, 0.91, 0.0, 0.75, 0.9])


LOCAL = {0: [100, 100, 0, 50, 90, 0, 0, 0, 0, 0], 1: [70, 82, 0, 100, 90, 0, 0, 0, 0, 0]}


def _ddp_mid_epoch_worker(rank, port, out, mode):
    """Your own DDP loop, two batches per epoch: ``mode`` "full" runs 10 epochs; "sum" / "plain" stop
    after epoch 1's first batch, rank 0 saving ``state_dict(sum_ranks=True)`` (called on every rank) /
    ``state_dict()``, then fresh objects on both ranks load that one state and finish the run."""
    import torch.distributed as dist
    from test_ddp import _env

    _env(rank, 2, port)
    dist.init_process_group("gloo")
    local = LOCAL[rank]

    def batch(rifle, e, half):
        c = local[e] // 2 if half == 0 else local[e] - local[e] // 2
        rifle.observe(loss(rank, e, half), correct=c, count=50)

    model = tiny()
    rifle = Rifle(model, None, epochs=10, reinits=2, trigger="converged", converged_acc=0.9)
    start = 0
    if mode != "full":
        rifle.on_epoch_start(0)
        batch(rifle, 0, 0), batch(rifle, 0, 1)
        rifle.settle_trigger()
        rifle.on_epoch_start(1)
        batch(rifle, 1, 0)
        state = rifle.state_dict(sum_ranks=True) if mode == "sum" else rifle.state_dict()
        if rank == 0:
            with open(f"{out}/state.json", "w") as f:
                json.dump(state, f)
        dist.barrier()
        with open(f"{out}/state.json") as f:
            saved = json.load(f)
        model = tiny()  # no re-init before epoch 2: the weights are the initial ones
        rifle = Rifle(model, None, epochs=10, reinits=2, trigger="converged", converged_acc=0.9)
        rifle.load_state_dict(saved)
        rifle.on_epoch_start(1)  # a loop resuming inside epoch 1 calls it again: nothing fires twice
        batch(rifle, 1, 1)
        rifle.settle_trigger()
        start = 2
    for e in range(start, 10):
        rifle.on_epoch_start(e)
        batch(rifle, e, 0), batch(rifle, e, 1)
        rifle.settle_trigger()
    rifle.close_diagnosis()
    with open(f"{out}/{mode}{rank}.json", "w") as f:
        json.dump(
            {
                "fired": rifle.fired,
                "report": rifle.trigger_report,
                "diagnosis": rifle.diagnosis,
                "head": model[2].weight.tolist(),
            },
            f,
        )
    leave_group()


def loss(rank, e, half):
    """Each batch's mean loss in the mid-epoch test: all different, so a lost or doubled batch shows."""
    return 0.1 * (half + 1) + 0.2 * rank + 0.01 * e


def test_ddp_own_loop_mid_epoch_checkpoint_counts_every_batch_once(tmp_path):
    """A checkpoint inside an epoch of your own DDP loop: with ``state_dict(sum_ranks=True)`` the
    resumed run equals the uninterrupted one; with a plain ``state_dict()`` of rank 0 the epoch's
    accuracy counts the batches it has once (rank 1's before the checkpoint are missing), never twice."""
    from test_ddp import free_port

    for mode in ("full", "sum", "plain"):
        mp.spawn(_ddp_mid_epoch_worker, args=(free_port(), str(tmp_path), mode), nprocs=2, join=True)
    res = {
        f"{m}{r}": json.loads((tmp_path / f"{m}{r}.json").read_text())
        for m in ("full", "sum", "plain")
        for r in (0, 1)
    }
    assert res["full0"] == res["full1"] and res["sum0"] == res["sum1"] and res["plain0"] == res["plain1"]
    assert res["sum0"] == res["full0"] and res["full0"]["fired"] == [2, 5]
    # epoch 1 without the sum: rank 0's 50 + 50 and rank 1's second 41 correct of 150 (0.94);
    # loading rank 0's sums on both ranks would have counted them twice: 191 of 200 (0.955)
    acc = dict((e, a) for e, a in res["plain0"]["report"]["train_acc"])
    assert acc[1] == pytest.approx(141 / 150) and acc[0] == pytest.approx(0.85)
    assert res["plain0"]["fired"] == [2, 5]
    # the diagnosis: loss / accuracy of the epoch before each re-init, both ranks' batches (by hand)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    full = res["full0"]["diagnosis"]
    assert [(d["at"], d["train_acc_before"]) for d in full] == [
        (2, pytest.approx(182 / 200)),
        (5, pytest.approx(180 / 200)),
    ]
    for d, e in zip(full, (1, 4)):
        assert d["train_loss_before"] == pytest.approx(mean([loss(r, e, h) for r in (0, 1) for h in (0, 1)]))
    # resumed inside epoch 1 (on_epoch_start(1) called again): the restored window stands
    assert res["sum0"]["diagnosis"] == full
    plain = res["plain0"]["diagnosis"][0]  # rank 1's first batch of epoch 1 is missing, as for the accuracy
    assert plain["train_acc_before"] == pytest.approx(141 / 150)
    assert plain["train_loss_before"] == pytest.approx(mean([loss(0, 1, 0), loss(0, 1, 1), loss(1, 1, 1)]))


# ---------------------------------------------------------------------------- CLI
ARGV = [
    "train",
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--method",
    "rifle",
    "--reinit-trigger",
    "converged",
    "--reinit-converged-acc",
    "0.5",
    "--reinits",
    "2",
    "--epochs",
    "8",
    "--image-size",
    "16",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--train-fraction",
    "0.4",
    "--min-steps-after",
    "0",
    "--device",
    "cpu",
]


def expected_fires(rows, thr, k, epochs):
    guard = max(1, -(-epochs // 8))
    fired = []
    for e in range(1, epochs - guard + 1):
        if len(fired) < k and rows[e - 1]["train_acc"] >= thr and (not fired or e - 1 > fired[-1]):
            fired.append(e)
    return fired


def test_cli_fires_when_the_train_accuracy_reached_the_threshold(tmp_path, capsys):
    code, out, _ = run_cli([*ARGV, "--out", tmp_path / "run"], capsys)
    assert code == 0
    rows = metrics(tmp_path / "run")
    expect = expected_fires(rows, 0.5, 2, 8)
    assert len(expect) == 2, [r["train_acc"] for r in rows]  # the recipe converges twice: a real test
    assert [r["epoch"] for r in rows if r["reinit"]] == expect
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rifle_trigger"]["fired"] == expect and summary["reinit_epochs"] == expect
    assert summary["rifle_trigger"]["reason"] is None
    assert [a for _, a in summary["rifle_trigger"]["train_acc"]] == [r["train_acc"] for r in rows]
    assert [d["at"] for d in summary["rifle_diagnosis"]] == expect
    assert "once the previous epoch's train accuracy reaches 0.5" in out

    # never converged: threshold 1.0 on this recipe -> no re-init, a line and the reason in summary.json
    argv = [a if a != "0.5" else "1.0" for a in ARGV]
    code, out, _ = run_cli([*argv, "--epochs", "3", "--out", tmp_path / "never"], capsys)
    best = max(metrics(tmp_path / "never"), key=lambda r: r["train_acc"])
    summary = json.loads((tmp_path / "never" / "summary.json").read_text())
    reason = f"train accuracy never reached 1 (best {best['train_acc']:.2f} at epoch {best['epoch']})"
    assert summary["rifle_trigger"]["fired"] == [] and summary["rifle_trigger"]["reason"] == reason
    assert summary["reinit_epochs"] == [] and summary["rifle_diagnosis"] == []
    assert f"RIFLE trigger: no re-init: {reason}" in out


def test_cli_killed_and_resumed_gives_the_same_run(tmp_path, capsys):
    code, _, _ = run_cli([*ARGV, "--out", tmp_path / "full"], capsys)
    full = metrics(tmp_path / "full")
    fires = [r["epoch"] for r in full if r["reinit"]]
    assert len(fires) == 2
    # killed just before the second re-init: the checkpoint holds the trigger's decision input
    killed_at_epoch([*ARGV, "--out", str(tmp_path / "split")], fires[1], cwd=tmp_path)
    assert len(metrics(tmp_path / "split")) == fires[1]
    code, _, _ = run_cli([*ARGV, "--out", tmp_path / "split", "--resume"], capsys)
    assert code == 0 and metrics(tmp_path / "split") == full
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("full", "split"))
    assert a["rifle_trigger"] == b["rifle_trigger"] and a["rifle_diagnosis"] == b["rifle_diagnosis"]


def test_callbacks_take_the_converged_trigger_per_epoch_only():
    """Both callbacks: the granularity each trigger gets (given, or the default) and the exact refusals.
    Their runs in the real trainers: tests/test_integration_*.py (converged_trigger_*)."""
    pytest.importorskip("lightning")
    from rifle.integrations.lightning import RifleCallback

    pytest.importorskip("transformers")
    from rifle.integrations.transformers import RifleTrainerCallback

    step_refused = (
        "trigger='converged' decides once per epoch from the epoch's training accuracy: use "
        "granularity='epoch' (step granularity is not supported with it)"
    )
    for cls, default in ((RifleCallback, "epoch"), (RifleTrainerCallback, "step")):
        assert cls().granularity == default and cls(granularity=None).granularity == default
        assert (
            cls(trigger="converged").granularity
            == cls(trigger="converged", granularity=None).granularity
            == cls(trigger="converged", granularity="epoch").granularity
            == "epoch"
        )
        assert cls(granularity="step").granularity == "step"
        with pytest.raises(ValueError) as e:
            cls(trigger="converged", granularity="step")
        assert str(e.value) == step_refused
        with pytest.raises(ValueError) as e:
            cls(trigger="sometimes")
        assert str(e.value) == (
            "trigger='sometimes': choose 'schedule' (the paper's fixed re-init points) or "
            "'converged' (re-init once the head has converged; docs/rifle.md#trigger)"
        )
        with pytest.raises(ValueError) as e:
            cls(granularity="batch")
        assert str(e.value) == "granularity must be 'epoch' or 'step', got 'batch'"


def test_a_run_recorded_before_the_trigger_existed_still_resumes():
    """config.yaml of older runs lacks reinit_trigger / reinit_converged_acc: they meant the default."""
    from rifle.config import diff_configs

    saved = TrainConfig(method="rifle").validate().to_dict()
    del saved["reinit_trigger"], saved["reinit_converged_acc"]
    assert diff_configs(saved, TrainConfig(method="rifle").validate().to_dict()) == {}
    now = TrainConfig(method="rifle", reinit_trigger="converged").validate().to_dict()
    assert diff_configs(saved, now) == {"reinit_trigger": ("schedule", "converged")}


def test_docs_trigger_example_prints_what_it_says(capsys):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "rifle.md").read_text()
    section = doc[doc.index('<a id="trigger"></a>') : doc.index('<a id="when"></a>')]
    [block] = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(
        compile("import torch\nfrom torch import nn\nfrom rifle import Rifle\n" + block, "rifle.md", "exec"),
        {},
    )
    assert capsys.readouterr().out.split("\n")[:2] == [
        "[3, 6]",
        "train accuracy never reached 0.97 (best 0.89 at epoch 9)",
    ]
    assert "**Default 0.97**" in section and "--reinit-trigger converged" in section


def _ddp_train_worker(rank, port, out, crash_at, resume):
    from rifle.config import TrainConfig
    from rifle.methods.rifle import RifleMethod
    from rifle.run import run_train
    from rifle.train import Trainer
    from test_ddp import _env

    _env(rank, 2, port)
    local, fired = {}, {}
    original_end, original_epoch = RifleMethod.on_batch_end, Trainer.train_epoch

    def on_batch_end(self, loss, correct, count):  # this rank's own accuracy per epoch
        e = self.core._trigger.epoch
        c, n = local.get(e, (0, 0))
        local[e] = (c + int(correct), n + count)
        return original_end(self, loss, correct, count)

    def train_epoch(self, epoch):
        if epoch == crash_at:
            raise KeyboardInterrupt
        row = original_epoch(self, epoch)
        fired[epoch] = list(self.methods[0].core.fired)
        return row

    RifleMethod.on_batch_end, Trainer.train_epoch = on_batch_end, train_epoch
    cfg = TrainConfig(
        data="digits",
        model="tiny_cnn",
        method="rifle",
        reinits=2,
        epochs=8,
        image_size=16,
        batch_size=64,
        lr=0.05,
        train_fraction=0.4,
        min_steps_after=0,
        out=out,
        reinit_trigger="converged",
        reinit_converged_acc=0.5,
    ).validate()
    try:
        run_train(cfg, resume=resume, log=lambda s: None)
    except KeyboardInterrupt:
        pass
    with open(f"{out}/rank{rank}-{crash_at}-{int(resume)}.json", "w") as f:
        json.dump({"local": {e: c / n for e, (c, n) in local.items()}, "fired": fired}, f)
    leave_group()


def test_ddp_training_run_decides_from_the_reduced_accuracy_and_resumes(tmp_path):
    """2 gloo ranks through the trainer: the ranks' own accuracies differ, both fire where the run's
    (reduced) train_acc says, and an interruption just before the second re-init resumes exactly."""
    from test_ddp import free_port

    full, split = tmp_path / "full", tmp_path / "split"
    mp.spawn(_ddp_train_worker, args=(free_port(), str(full), -1, False), nprocs=2, join=True)
    rows = metrics(full)
    expect = expected_fires(rows, 0.5, 2, 8)
    assert len(expect) == 2 and [r["epoch"] for r in rows if r["reinit"]] == expect
    r0, r1 = (json.loads((full / f"rank{r}--1-0.json").read_text()) for r in (0, 1))
    assert r0["fired"] == r1["fired"] and r0["fired"]["7"] == expect
    assert r0["local"] != r1["local"]  # the ranks saw different accuracies; the decision is the sum's
    for e, row in enumerate(rows):
        assert (r0["local"][str(e)] + r1["local"][str(e)]) / 2 == pytest.approx(row["train_acc"])
    summary = json.loads((full / "summary.json").read_text())
    assert summary["rifle_trigger"]["fired"] == expect
    mp.spawn(_ddp_train_worker, args=(free_port(), str(split), expect[1], False), nprocs=2, join=True)
    assert len(metrics(split)) == expect[1]
    mp.spawn(_ddp_train_worker, args=(free_port(), str(split), -1, True), nprocs=2, join=True)
    assert metrics(split) == rows
    assert json.loads((split / "summary.json").read_text())["rifle_trigger"] == summary["rifle_trigger"]


def _train(trigger_kw, accs, epochs=10, spe=20):
    """A real loop (SGD steps) with hand-fed accuracies; returns the Rifle and the number of
    per-step gradient-norm reads of its diagnosis."""
    from rifle.core import diagnosis

    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rifle = Rifle(
        model, opt, epochs=epochs, reinits=1, seed=0, steps_per_epoch=spe, min_steps_after=None, **trigger_kw
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(spe * 4, 4, generator=g), torch.randint(0, 3, (spe * 4,), generator=g)
    reads = 0
    original = diagnosis.Diagnosis._norms

    def counting(self):
        nonlocal reads
        reads += 1
        return original(self)

    diagnosis.Diagnosis._norms = counting
    try:
        for e in range(epochs):
            rifle.on_epoch_start(e)
            for i in range(spe):
                loss = nn.functional.cross_entropy(model(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4])
                opt.zero_grad()
                loss.backward()
                rifle.observe(loss, correct=round(accs[e] * 4) if i < spe // 2 else 0, count=4)
                opt.step()
            rifle.observe(0.0, correct=round(accs[e] * 4 * spe) - round(accs[e] * 4) * (spe // 2), count=0)
    finally:
        diagnosis.Diagnosis._norms = original
    rifle.close_diagnosis()
    return rifle, reads


def test_the_reinit_and_its_diagnosis_are_the_schedules_and_cost_only_the_last_steps():
    accs = [0.5, 0.6, 0.7, 0.8, 0.98] + [0.99] * 5
    sched, sched_reads = _train({}, accs)  # K=1, E=10: epoch 5
    trig, trig_reads = _train({"trigger": "converged"}, accs)  # 0.98 at 4 -> epoch 5
    assert sched.points == trig.fired == [5]
    assert trig.diagnosis == sched.diagnosis  # same draw, same windows, same numbers
    assert trig.diagnosis[0]["steps_before"] == 5 and trig.diagnosis[0]["steps_after"] == 5
    for a, b in zip(sched.model.parameters(), trig.model.parameters()):
        assert torch.equal(a, b)
    assert sched_reads == 10
    # epochs 0..4 could each precede a re-init: 5 norm reads at the end of each, 5 after the re-init
    assert trig_reads == 5 * 5 + 5
    never, never_reads = _train({"trigger": "converged"}, [0.5] * 10)
    assert never.fired == [] and never_reads == 5 * 8  # E=10, guard 2: epochs 1..8 were possible


def test_checkpoints_carry_the_captured_batch_only_before_a_reinit():
    """The head signal's captured batch (tensors) goes into a state only when a re-init may follow it:
    at an epoch's end the trigger has decided (settled), so only the epoch before the one it fires at
    carries it; inside an epoch (not settled) an armed state keeps it. Resuming from each epoch's end
    measures what the uninterrupted run did."""
    accs = [0.5, 0.98, 0.99, 0.99, 0.99, 0.5]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)

    def run(start=0, state=None, stop=6):
        model = tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        rifle = Rifle(
            model,
            opt,
            epochs=6,
            reinits=1,
            trigger="converged",
            steps_per_epoch=4,
            diagnosis_window=2,
            min_steps_after=None,
        )
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            rifle.load_state_dict(state["rifle"])
        carried, inside, saved = {}, {}, {}
        for e in range(start, stop):
            rifle.on_epoch_start(e)
            for i in range(4):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4])
                loss.backward()
                rifle.observe(loss, correct=round(accs[e] * 4), count=4)
                opt.step()
                if i == 3:  # the last step, before the epoch's end: nothing settled yet
                    inside[e] = rifle.state_dict()["diagnosis_pending"]["head_batch"] is not None
            rifle.settle_trigger()
            saved[e] = {
                "model": copy.deepcopy(model.state_dict()),
                "opt": copy.deepcopy(opt.state_dict()),
                "rifle": rifle.state_dict(),
            }
            batch = saved[e]["rifle"]["diagnosis_pending"]["head_batch"]
            carried[e] = (
                None
                if batch is None
                else tuple(batch["ranks"][0]["f"].shape)
                if "ranks" in batch
                else tuple(batch["f"].shape)
            )
        rifle.close_diagnosis()
        return rifle, carried, inside, saved

    full, carried, inside, saved = run()
    assert full.fired == [2] and full.diagnosis[0]["head_signal_reason"] is None
    assert carried == {0: None, 1: (4, 4), 2: None, 3: None, 4: None, 5: None}
    assert inside == {0: True, 1: True, 2: False, 3: False, 4: False, 5: False}  # armed until K fired
    for e in (0, 1, 2):
        resumed = run(e + 1, saved[e])[0]
        assert resumed.diagnosis == full.diagnosis and resumed.fired == [2]
