"""RifleCallback in a real lightning.Trainer on scikit-learn's digits (CPU, a tiny MLP)."""

import csv
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import leave_group

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from rifle.core.reinit import draw_values  # noqa: E402
from rifle.core.schedule import RifleScheduleWarning  # noqa: E402
from rifle.core.seeding import generator  # noqa: E402
from rifle.integrations.lightning import RifleCallback, find_lightning_head  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint"),
    pytest.mark.filterwarnings("ignore:.*dataloader is not resumable"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]
DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations" / "lightning.md"
N, BATCH = 256, 64  # 4 optimizer steps per epoch


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:N], dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target[:N], dtype=torch.long)


X, Y = digits()


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a stream derived from (seed, epoch); Lightning calls set_epoch each epoch."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=generator(self.seed, "order", self.epoch)).tolist())

    def __len__(self):
        return self.n


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


class Digits(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = MLP()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(X, Y), batch_size=BATCH, sampler=EpochSampler(N)
        )


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def trainer(tmp_path, callbacks, epochs=6, logger=False, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
        callbacks=callbacks,
        **kw,
    )


def model(seed=0):
    pl.seed_everything(seed, verbose=False)
    return Digits()


class Probe(pl.Callback):
    """Weights and optimizer-state keys at each epoch end and at each batch start / end."""

    def __init__(self):
        self.epoch_end, self.epoch_first_batch, self.step_start, self.step_end = {}, {}, {}, {}

    @staticmethod
    def _record(trainer, pl_module):
        opt = trainer.optimizers[0]
        held = {n for n, p in pl_module.named_parameters() if opt.state.get(p)}
        return snapshot(pl_module), held

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_end[trainer.current_epoch] = self._record(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rec = self._record(trainer, pl_module)
        self.step_start[trainer.global_step] = rec
        if batch_idx == 0:
            self.epoch_first_batch[trainer.current_epoch] = rec

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_end[trainer.global_step] = self._record(trainer, pl_module)


HEAD = ("net.fc.weight", "net.fc.bias")
ALL = {"net.body.0.weight", "net.body.0.bias", *HEAD}


def changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_epoch_reinit_changes_only_the_head_at_the_scheduled_epochs(tmp_path):
    m = model()
    rifle_cb, probe = RifleCallback(reinits=2, seed=3, min_steps_after=None), Probe()
    trainer(tmp_path, [rifle_cb, probe], logger=CSVLogger(tmp_path, name="csv")).fit(m)
    assert rifle_cb.rifle.reinit_epochs == [2, 4]  # floor(i*6/3)
    assert rifle_cb.rifle.module_names == ["net.fc"]  # found inside the LightningModule's `net`
    assert rifle_cb.fired == [(1, 2), (2, 4)]
    for e in range(1, 6):
        (before, held_before), (after, held_after) = probe.epoch_end[e - 1], probe.epoch_first_batch[e]
        assert held_before == ALL  # momentum buffers exist for every parameter
        if e in (2, 4):
            assert changed(before, after) == set(HEAD)  # the head moved, nothing else did
            assert held_after == ALL - set(HEAD)  # the head's momentum is cleared, the body's kept
            w, b = draw_values([m.net.fc], seed=3, index=(1 if e == 2 else 2))[0]
            assert torch.equal(after["net.fc.weight"], w) and torch.equal(after["net.fc.bias"], b)
        else:
            assert changed(before, after) == set() and held_after == ALL
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()))
    logged = {int(r["epoch"]): float(r["rifle/reinit"]) for r in rows if r.get("rifle/reinit")}
    assert logged == {2: 1.0, 4: 2.0}


def test_step_granularity_uses_global_step_and_warns_about_short_periods(tmp_path):
    m = model()
    rifle_cb, probe = RifleCallback(reinits=2, granularity="step", seed=1), Probe()
    with pytest.warns(RifleScheduleWarning, match="min_steps_after"):
        trainer(tmp_path, [rifle_cb, probe]).fit(m)
    assert rifle_cb.rifle.reinit_steps == [8, 16]  # 24 optimizer steps
    assert rifle_cb.fired == [(1, 8), (2, 16)]
    for g in range(1, 24):
        (before, _), (after, held) = probe.step_end[g], probe.step_start[g]
        assert changed(before, after) == (set(HEAD) if g in (8, 16) else set())
        assert held == (ALL - set(HEAD) if g in (8, 16) else ALL)


def full_run_with_checkpoints(tmp_path, **cb):
    m = model()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    rifle_cb = RifleCallback(reinits=2, seed=5, min_steps_after=None, **cb)
    trainer(tmp_path, [rifle_cb, ckpt]).fit(m)
    return m, rifle_cb


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    m, rifle_cb = full_run_with_checkpoints(tmp)
    return tmp, snapshot(m), rifle_cb


@pytest.mark.parametrize(
    "after_epoch, expected",
    [
        (1, [(1, 2), (2, 4)]),  # resumes at epoch 2, a re-init epoch: it must not be skipped
        (2, [(2, 4)]),  # right after the re-init epoch 2: re-init 1 must not repeat
        (3, [(2, 4)]),  # between re-inits
        (4, []),  # after the last re-init
    ],
)
def test_resume_never_repeats_or_skips_and_matches_uninterrupted_run(
    full_run, tmp_path, after_epoch, expected
):
    tmp, final, full_cb = full_run
    assert full_cb.fired == [(1, 2), (2, 4)]
    state = torch.load(tmp / "ckpt" / f"epoch={after_epoch}.ckpt", weights_only=True)
    assert state["callbacks"]["RifleCallback"]["done"] == [i for i, p in [(1, 2), (2, 4)] if p <= after_epoch]
    m = model(seed=99)  # different initial weights: everything must come from the checkpoint
    rifle_cb = RifleCallback(reinits=2, seed=5, min_steps_after=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RifleScheduleWarning)  # no "re-init was not applied"
        trainer(tmp_path, [rifle_cb]).fit(m, ckpt_path=tmp / "ckpt" / f"epoch={after_epoch}.ckpt")
    assert rifle_cb.fired == expected
    assert rifle_cb.rifle.state_dict()["done"] == [1, 2]
    resumed = snapshot(m)
    assert all(torch.equal(resumed[k], final[k]) for k in final), changed(resumed, final)


def test_resume_with_another_schedule_is_refused(full_run, tmp_path):
    tmp, _, _ = full_run
    with pytest.raises(ValueError, match="different schedule"):
        trainer(tmp_path, [RifleCallback(reinits=3, seed=5, min_steps_after=None)]).fit(
            model(), ckpt_path=tmp / "ckpt" / "epoch=1.ckpt"
        )


def test_step_resume_from_mid_epoch_checkpoint(tmp_path):
    def run(ckpt_path=None, callbacks=()):
        cb = RifleCallback(reinits=2, granularity="step", seed=2, min_steps_after=None)
        m = model()
        trainer(tmp_path, [cb, *callbacks]).fit(m, ckpt_path=ckpt_path)
        return cb, snapshot(m)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "s", filename="{step}", save_top_k=-1, every_n_train_steps=5)
    full_cb, final = run(callbacks=[ckpt])
    assert full_cb.fired == [(1, 8), (2, 16)]
    cb, resumed = run(tmp_path / "s" / "step=10.ckpt")  # mid-epoch 2, between the re-inits
    assert cb.fired == [(2, 16)] and cb.rifle.state_dict()["done"] == [1, 2]
    cb, resumed = run(tmp_path / "s" / "step=5.ckpt")  # before the first
    assert cb.fired == [(1, 8), (2, 16)]


def test_epoch_resume_inside_a_reinit_epoch(tmp_path):
    # A checkpoint in the middle of epoch 2 (after re-init 1 at its start). Lightning 2.x continues
    # that epoch without calling on_train_epoch_start(2) again; the restored state says re-init 1 is
    # done, so nothing is repeated or reported missing. Without the state (a checkpoint made without
    # the callback) the core notices the passed point and warns instead of silently guessing.
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "s", filename="{step}", save_top_k=-1, every_n_train_steps=10
    )  # step 10 = batch 2 of epoch 2
    full_cb = RifleCallback(reinits=2, seed=5, min_steps_after=None)
    trainer(tmp_path, [full_cb, ckpt]).fit(model())
    path = tmp_path / "s" / "step=10.ckpt"
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and state["callbacks"]["RifleCallback"]["done"] == [1]
    cb = RifleCallback(reinits=2, seed=5, min_steps_after=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RifleScheduleWarning)
        trainer(tmp_path, [cb]).fit(model(), ckpt_path=path)
    assert cb.fired == [(2, 4)] and cb.rifle.state_dict()["done"] == [1, 2]
    del state["callbacks"]["RifleCallback"]
    torch.save(state, tmp_path / "stateless.ckpt")
    cb = RifleCallback(reinits=2, seed=5, min_steps_after=None)
    with pytest.warns(RifleScheduleWarning, match="epoch 2 was not applied"):
        trainer(tmp_path, [cb]).fit(model(), ckpt_path=tmp_path / "stateless.ckpt")
    assert cb.fired == [(2, 4)]


@pytest.fixture(scope="module")
def step_checkpoints(tmp_path_factory):
    """The uninterrupted epoch-schedule run (re-inits at epochs 2, 4 = steps 8, 16), saved every 2 steps."""
    tmp = tmp_path_factory.mktemp("steps")
    m = model()
    ckpt = ModelCheckpoint(dirpath=tmp / "s", filename="{step}", save_top_k=-1, every_n_train_steps=2)
    full_cb = RifleCallback(reinits=2, seed=5, min_steps_after=None)
    trainer(tmp, [full_cb, ckpt]).fit(m)
    assert full_cb.fired == [(1, 2), (2, 4)]
    return tmp, snapshot(m)


@pytest.mark.parametrize(
    "step, expected, same_weights",
    [
        # a step checkpoint on the LAST batch of the epoch before a re-init epoch: Lightning resumes into
        # the next epoch without calling on_train_epoch_start for it; the re-init must still fire there
        (8, [(1, 2), (2, 4)], True),  # last batch of epoch 1, re-init 1 at epoch 2
        (16, [(2, 4)], True),  # last batch of epoch 3, re-init 2 at epoch 4
        (12, [(2, 4)], True),  # last batch of epoch 2 (after re-init 1): nothing repeated
        (6, [(1, 2), (2, 4)], False),  # mid-epoch 1 (the epoch restarts its data: weights differ)
        (10, [(2, 4)], False),  # mid-epoch 2, inside the re-init epoch
    ],
)
def test_resume_from_a_step_checkpoint_fires_each_reinit_once(
    step_checkpoints, tmp_path, step, expected, same_weights
):
    tmp, final = step_checkpoints
    path = tmp / "s" / f"step={step}.ckpt"
    m, cb, probe = model(seed=99), RifleCallback(reinits=2, seed=5, min_steps_after=None), Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RifleScheduleWarning)  # no "re-init ... was not applied"
        trainer(tmp_path, [cb, probe]).fit(m, ckpt_path=path)
    assert cb.fired == expected and cb.rifle.state_dict()["done"] == [1, 2]
    for index, epoch in expected:  # re-drawn at the first batch of its epoch, with its seeded values
        w, b = draw_values([m.net.fc], seed=5, index=index)[0]
        after = probe.epoch_first_batch[epoch][0]
        assert torch.equal(after["net.fc.weight"], w) and torch.equal(after["net.fc.bias"], b)
    if same_weights:  # resumed at an epoch boundary: exactly the uninterrupted run's weights
        resumed = snapshot(m)
        assert all(torch.equal(resumed[k], final[k]) for k in final), changed(resumed, final)


class TwoGroups(Digits):
    def configure_optimizers(self):  # the head alone in its param group (head_lr_restart needs it)
        return torch.optim.SGD(
            [{"params": self.net.body.parameters()}, {"params": self.net.fc.parameters()}],
            lr=0.1,
            momentum=0.9,
        )


class HeadLR(pl.Callback):
    def __init__(self):
        self.lrs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lrs[trainer.current_epoch] = trainer.optimizers[0].param_groups[1]["lr"]


def test_head_lr_restart_survives_resume(tmp_path):
    # K=1 over 6 epochs: periods [0,3) and [3,6); head LR = 0.1 * cosine restarted each period,
    # also after Trainer.fit(ckpt_path=...) restored the optimizer (which replaces its param groups)
    import math

    expect = {e: 0.1 * 0.5 * (1 + math.cos(math.pi * (e % 3) / 3)) for e in range(6)}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full, resumed = HeadLR(), HeadLR()
    pl.seed_everything(0)
    trainer(tmp_path, [RifleCallback(reinits=1, head_lr_restart=True, min_steps_after=None), full, ckpt]).fit(
        TwoGroups()
    )
    assert full.lrs == pytest.approx(expect)
    pl.seed_everything(0)
    trainer(tmp_path, [RifleCallback(reinits=1, head_lr_restart=True, min_steps_after=None), resumed]).fit(
        TwoGroups(), ckpt_path=tmp_path / "c" / "epoch=1.ckpt"
    )
    assert resumed.lrs == pytest.approx({e: expect[e] for e in range(2, 6)})


def test_head_discovery_inside_a_lightning_module():
    m = Digits()
    assert find_lightning_head(m) == [m.net.fc]  # via the child `net`
    assert find_lightning_head(m, "net.body.0") == [m.net.body[0]]

    class TopLevel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 2))

    t = TopLevel()
    assert find_lightning_head(t) == [t.classifier[1]]

    class Two(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = MLP(), MLP()

    with pytest.raises(ValueError, match=r"student\.fc.*head='student\.fc'"):
        find_lightning_head(Two())

    class NoHead(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Conv1d(1, 1, 1)

    with pytest.raises(ValueError, match="direct child"):
        find_lightning_head(NoHead())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="granularity"):
        RifleCallback(granularity="batch")
    with pytest.warns(RifleScheduleWarning, match="max_steps=10 ends training earlier"):
        trainer(tmp_path, [RifleCallback(reinits=1, min_steps_after=None)], max_steps=10).fit(model())


def test_import_rifle_does_not_import_the_frameworks():
    code = (
        "import sys, rifle, rifle.integrations; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_doc_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), ns)
    assert ns["rifle_cb"].fired == [(1, 2), (2, 4)]
    report = ns["trigger_cb"].trigger_report  # the converged-trigger example: what its comments say
    assert [round(a, 2) for _, a in report["train_acc"]] == [0.07, 0.29, 0.57, 0.66, 0.8, 0.12, 0.57, 0.87]
    assert report["train_acc"][4][1] >= 0.8 > report["train_acc"][3][1] and ns["trigger_cb"].fired == [(1, 5)]


# ---------------------------------------------------------------------------- trigger="converged"
class WithAccuracy(Digits):
    """training_step returns the accuracy contract; records each epoch's correct / count itself."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        correct = (logits.argmax(1) == y).sum()
        c, n = self.seen.get(self.current_epoch, (0, 0))
        self.seen[self.current_epoch] = [c + int(correct), n + len(y)]
        return {"loss": F.cross_entropy(logits, y), "correct": correct, "count": len(y)}


def acc_model(seed=0):
    pl.seed_everything(seed, verbose=False)
    return WithAccuracy()


def first_fire(accs, threshold):
    return next(e + 1 for e, a in enumerate(accs) if a >= threshold)


def test_converged_trigger_fires_at_the_first_epoch_after_the_train_accuracy_reached_it(tmp_path, capsys):
    m, probe = acc_model(), Probe()
    cb = RifleCallback(reinits=2, seed=3, min_steps_after=None, trigger="converged", converged_acc=0.8)
    trainer(tmp_path, [cb, probe], epochs=8, logger=CSVLogger(tmp_path, name="csv")).fit(m)
    accs = [m.seen[e][0] / m.seen[e][1] for e in range(8)]  # counted by the module itself
    report = cb.trigger_report
    assert report["train_acc"] == [[e, a] for e, a in enumerate(accs)]
    fire = first_fire(accs, 0.8)
    assert 2 <= fire <= 6, accs  # the recipe converges mid-run: a real test
    assert cb.fired[0] == (1, fire) and [e for _, e in cb.fired] == report["fired"]
    for e in range(1, 8):  # the head moved between epochs exactly at the fired epochs
        before, after = probe.epoch_end[e - 1][0], probe.epoch_first_batch[e][0]
        assert changed(before, after) == (set(HEAD) if e in report["fired"] else set()), e
    w, b = draw_values([m.net.fc], seed=3, index=1)[0]  # re-init 1's seeded draw, as the schedule's
    after = probe.epoch_first_batch[fire][0]
    assert torch.equal(after["net.fc.weight"], w) and torch.equal(after["net.fc.bias"], b)
    [d, *_] = cb.diagnosis  # the re-init's diagnosis carries the accuracy the trigger decided from
    assert d["at"] == fire and d["train_acc_before"] == pytest.approx(accs[fire - 1])
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()))
    assert {int(r["epoch"]) for r in rows if r.get("rifle/reinit")} == set(report["fired"])


def test_converged_trigger_that_never_converges_does_not_fire_and_says_why(tmp_path, capsys):
    m, probe = acc_model(), Probe()
    cb = RifleCallback(reinits=1, min_steps_after=None, trigger="converged", converged_acc=1.0)
    trainer(tmp_path, [cb, probe], epochs=4).fit(m)
    accs = [m.seen[e][0] / m.seen[e][1] for e in range(4)]
    assert cb.fired == [] and cb.rifle.applied == [] and cb.diagnosis == []
    for e in range(1, 4):
        assert changed(probe.epoch_end[e - 1][0], probe.epoch_first_batch[e][0]) == set()
    best = max(range(4), key=lambda e: (accs[e], -e))
    reason = f"train accuracy never reached 1 (best {accs[best]:.2f} at epoch {best})"
    assert cb.trigger_report["fired"] == [] and cb.trigger_report["reason"] == reason
    assert f"RIFLE trigger: no re-init: {reason} (docs/rifle.md#trigger)" in capsys.readouterr().out


def test_converged_trigger_needs_the_accuracy_from_training_step(tmp_path):
    cb = RifleCallback(reinits=1, min_steps_after=None, trigger="converged")
    t = trainer(tmp_path, [cb], epochs=4)
    with pytest.raises(
        ValueError,
        match=r"training_step returns, which was a dict with keys \['loss'\]: "
        r"return \{'loss': loss, 'correct': .*'count': len\(y\)\}",
    ):
        t.fit(model())  # Digits.training_step returns the loss alone
    assert t.global_step == 1  # refused at the end of the first batch
    with pytest.raises(ValueError, match="trigger='converged' decides once per epoch.*granularity='epoch'"):
        RifleCallback(trigger="converged", granularity="step")
    with pytest.raises(ValueError, match="trigger='often'"):
        RifleCallback(trigger="often")
    with pytest.raises(ValueError, match="converged_acc=0.9 applies only with trigger='converged'"):
        trainer(tmp_path, [RifleCallback(converged_acc=0.9)]).fit(model())


@pytest.fixture(scope="module")
def converged_run(tmp_path_factory):
    """Uninterrupted trigger run (8 epochs of 4 steps), checkpoints at every epoch end and every 2 steps."""
    tmp = tmp_path_factory.mktemp("converged")
    m = acc_model()
    cbs = [
        ModelCheckpoint(dirpath=tmp / "e", filename="{epoch}", save_top_k=-1, every_n_epochs=1),
        ModelCheckpoint(dirpath=tmp / "s", filename="{step}", save_top_k=-1, every_n_train_steps=2),
    ]
    cb = RifleCallback(reinits=2, seed=5, min_steps_after=None, trigger="converged", converged_acc=0.8)
    trainer(tmp, [cb, *cbs], epochs=8).fit(m)
    return tmp, snapshot(m), cb


def test_converged_trigger_resumes_with_the_same_decisions(converged_run, tmp_path):
    tmp, final, full = converged_run
    fire = full.fired[0][1]
    assert len(full.fired) >= 1 and fire >= 2
    # epoch ends before / right before / after the first re-init, and a step checkpoint on the last
    # batch of the epoch that reached the threshold (its accuracy not yet summed: the open window)
    for path in [
        tmp / "e" / f"epoch={fire - 2}.ckpt",
        tmp / "e" / f"epoch={fire - 1}.ckpt",
        tmp / "e" / f"epoch={fire}.ckpt",
        tmp / "s" / f"step={4 * fire}.ckpt",
    ]:
        m, cb = (
            acc_model(seed=99),
            RifleCallback(reinits=2, seed=5, min_steps_after=None, trigger="converged", converged_acc=0.8),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RifleScheduleWarning)
            trainer(tmp_path, [cb], epochs=8).fit(m, ckpt_path=path)
        assert cb.trigger_report == full.trigger_report, path
        assert cb.rifle.applied == full.rifle.applied and cb.diagnosis == full.diagnosis, path
        resumed = snapshot(m)
        assert all(torch.equal(resumed[k], final[k]) for k in final), (path, changed(resumed, final))


# ---------------------------------------------------------------------------- logging (issue 14)
class GradNorms(pl.Callback):
    """The backbone weight's gradient norm at each optimizer step (after backward, before the update)."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms[trainer.global_step] = float(pl_module.net.body[0].weight.grad.norm(dtype=torch.float64))


def csv_rows(path):
    return list(csv.DictReader(open(next(path.rglob("metrics.csv")))))


def test_diagnosis_and_reinits_reach_the_trainers_logger(tmp_path):
    m, grads = acc_model(), GradNorms()
    cb = RifleCallback(reinits=1, seed=0, min_steps_after=None)  # 4 epochs of 4 steps: re-init at epoch 2
    trainer(tmp_path, [cb, grads], epochs=4, logger=CSVLogger(tmp_path, name="csv")).fit(m)
    [d] = cb.diagnosis
    # by hand: the 5 optimizer steps after the re-init (global steps 8..12) over those before it that
    # were recorded (armed at the start of epoch 1: 4..7); one backbone layer (net.body.0), so each
    # third is that layer's ratio
    assert (d["steps_before"], d["steps_after"]) == (4, 5)
    ratio = (sum(grads.norms[s] for s in range(8, 13)) / 5) / (sum(grads.norms[s] for s in range(4, 8)) / 4)
    assert d["grad_ratio"] == pytest.approx(ratio, rel=1e-9) and d["grad_ratio_thirds"] == pytest.approx(
        [ratio] * 3
    )
    assert d["train_acc_before"] == pytest.approx(m.seen[1][0] / m.seen[1][1])  # training_step's counts
    rows = csv_rows(tmp_path / "csv")
    [reinit] = [r for r in rows if r.get("rifle/reinit")]
    assert int(reinit["epoch"]) == 2 and float(reinit["rifle/reinit"]) == 1.0
    [row] = [r for r in rows if r.get("rifle/grad_ratio")]  # the epoch whose end completed the window
    assert int(row["epoch"]) == 3
    expect = {
        "rifle/diagnosis_of": 1,
        "rifle/grad_ratio": ratio,
        "rifle/grad_ratio_first": ratio,
        "rifle/grad_ratio_middle": ratio,
        "rifle/grad_ratio_last": ratio,
        "rifle/train_loss_before": d["train_loss_before"],
        "rifle/train_acc_before": d["train_acc_before"],
        "rifle/head_norm_before": d["head_norm_before"],
        "rifle/head_norm_after": d["head_norm_after"],
    }
    assert {k: float(row[k]) for k in expect} == pytest.approx(expect, rel=1e-6)


def test_a_diagnosis_closed_at_the_end_of_training_reaches_the_logger(tmp_path):
    # 2 epochs of 4 steps, re-init at epoch 1: the 'after' window (5 steps) is cut short by the end
    cb = RifleCallback(reinits=1, seed=0, min_steps_after=None, guard=1)
    trainer(tmp_path, [cb], epochs=2, logger=CSVLogger(tmp_path, name="csv")).fit(model())
    [d] = cb.diagnosis
    assert d["steps_after"] == 4 and d["grad_ratio"] > 0
    [row] = [r for r in csv_rows(tmp_path / "csv") if r.get("rifle/grad_ratio")]
    assert float(row["rifle/grad_ratio"]) == pytest.approx(d["grad_ratio"], rel=1e-6)
    assert int(row["step"]) == 8 and float(row["rifle/diagnosis_of"]) == 1.0


# ---------------------------------------------------------------------------- DDP (2 gloo ranks)
def _ddp_worker(rank, port, tmp, resume):
    import json
    from test_ddp import _env

    _env(rank, 2, port)
    m = acc_model()
    cb = RifleCallback(reinits=1, seed=5, min_steps_after=None, trigger="converged", converged_acc=0.5)
    saves = (
        []
        if resume
        else [ModelCheckpoint(dirpath=f"{tmp}/s", filename="{step}", save_top_k=-1, every_n_train_steps=3)]
    )
    t = pl.Trainer(
        max_epochs=8,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=[cb, *saves],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(m, ckpt_path=resume)
    with open(f"{tmp}/{'resumed' if resume else 'full'}{rank}.json", "w") as f:
        json.dump(
            {
                "seen": m.seen,
                "report": cb.trigger_report,
                "fired": cb.fired,
                "head": m.net.fc.weight.tolist(),
            },
            f,
        )
    leave_group()


@pytest.mark.slow
@pytest.mark.extended
def test_ddp_ranks_decide_from_the_summed_accuracy_and_a_mid_epoch_checkpoint_counts_once(tmp_path):
    """2 gloo ranks, each its half of every epoch: both fire where the accuracy summed over ranks
    first reaches the threshold; a checkpoint after the first batch of an epoch holds both ranks'
    sums, and the resumed run counts them once (rank 0) plus what each rank sees after it."""
    import json
    import torch.multiprocessing as mp
    from test_ddp import free_port

    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path), None), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"full{r}.json").read_text()) for r in (0, 1))
    assert r0["report"] == r1["report"] and r0["fired"] == r1["fired"] and r0["head"] == r1["head"]
    assert r0["seen"] != r1["seen"]  # the ranks saw different batches and accuracies
    summed = [
        (r0["seen"][str(e)][0] + r1["seen"][str(e)][0]) / (r0["seen"][str(e)][1] + r1["seen"][str(e)][1])
        for e in range(8)
    ]
    assert [a for _, a in r0["report"]["train_acc"]] == pytest.approx(summed)
    fire = next(e + 1 for e, a in enumerate(summed) if a >= 0.5)
    assert r0["fired"] == [[1, fire]], summed
    # 2 optimizer steps per epoch (128 examples per rank): step 3 = after the first batch of epoch 1
    path = tmp_path / "s" / "step=3.ckpt"
    window = torch.load(path, weights_only=True)["callbacks"]["RifleCallback"]["trigger_window"]
    assert window["epoch"] == 1 and window["count"] == 2 * 64  # both ranks' first batch of epoch 1
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path), str(path)), nprocs=2, join=True)
    s0, s1 = (json.loads((tmp_path / f"resumed{r}.json").read_text()) for r in (0, 1))
    assert s0["report"] == s1["report"] and s0["head"] == s1["head"]
    rest = [s0["seen"]["1"][k] + s1["seen"]["1"][k] for k in (0, 1)]  # what the ranks saw after it
    assert s0["report"]["train_acc"][1][1] == pytest.approx(
        (window["correct"] + rest[0]) / (window["count"] + rest[1])
    )
