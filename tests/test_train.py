"""Trainer semantics: resume reproduces the uninterrupted run, failures keep the last checkpoint."""

import pytest
import torch
from torch import nn

from conftest import interrupted_at_epoch, metrics, rifle_cfg as cfg
from rifle.methods.base import Method
from rifle.run import run_train
from rifle.train import CheckpointError, RunDirError, TrainingError
from rifle.train.checkpoint import WEIGHTS, read_metadata


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / WEIGHTS))


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, monkeypatch):
    full = run_train(cfg(tmp_path, "full"), log=lambda s: None)
    assert full["reinit_epochs"] == [2] and full["complete"]

    with interrupted_at_epoch(3), pytest.raises(KeyboardInterrupt):
        run_train(cfg(tmp_path, "split"), log=lambda s: None)
    assert len(metrics(tmp_path / "split")) == 3  # epochs 0-2 (re-init at 2 happened)
    assert read_metadata(tmp_path / "split" / WEIGHTS)["epoch"] == "2"
    resumed = run_train(cfg(tmp_path, "split"), resume=True, log=lambda s: None)

    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")  # no epoch twice, same numbers
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["final_test_acc"] == full["final_test_acc"]
    # resuming a finished run does nothing
    again = run_train(cfg(tmp_path, "split"), resume=True, log=lambda s: None)
    assert again["final_test_acc"] == full["final_test_acc"]


def test_same_seed_same_numbers_and_rifle_differs_from_finetune(tmp_path):
    a = run_train(cfg(tmp_path, "a", epochs=3, reinits=1), log=lambda s: None)
    run_train(cfg(tmp_path, "b", epochs=3, reinits=1), log=lambda s: None)
    c = run_train(cfg(tmp_path, "c", epochs=3, method="finetune"), log=lambda s: None)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    ma, mc = metrics(tmp_path / "a"), metrics(tmp_path / "c")
    assert ma[0] == {**mc[0], "reinit": False}  # identical until the re-init at epoch 1
    assert ma[1]["reinit"] and ma[1]["train_loss"] > mc[1]["train_loss"]  # the loss jumps
    assert a["reinit_epochs"] == [1] and c["reinit_epochs"] == []


class NaNAtEpoch1(Method):
    name = "nan"

    def __init__(self):
        self.epoch = 0

    def on_epoch_start(self, epoch):
        self.epoch = epoch
        return {}

    def loss_terms(self, logits, features, x, y):
        return {"bad": torch.tensor(float("nan"))} if self.epoch == 1 else {}


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    import rifle.run as run

    monkeypatch.setattr(run, "build_methods", lambda c: [NaNAtEpoch1()])
    with pytest.raises(TrainingError, match=r"epoch 1, step 0.*epoch 0"):
        run_train(cfg(tmp_path, "nan", method="finetune"), log=lambda s: None)
    assert read_metadata(tmp_path / "nan" / WEIGHTS)["epoch"] == "0"
    assert len(metrics(tmp_path / "nan")) == 1


def test_output_folder_rules(tmp_path):
    c = cfg(tmp_path, "o", epochs=2, reinits=1, method="finetune")
    run_train(c, log=lambda s: None)
    (tmp_path / "o-2").mkdir()
    with pytest.raises(RunDirError, match="already holds a run") as e:
        run_train(c, log=lambda s: None)
    assert (
        f"pass --resume to continue it, --overwrite to replace it, or another --out (e.g. --out "
        f"{tmp_path / 'o-3'}) to start a new one" in str(e.value)
    )
    changed = cfg(tmp_path, "o", epochs=3, lr=0.1, method="finetune")
    with pytest.raises(RunDirError) as e:  # another run's settings: --resume would be refused, say so
        run_train(changed, log=lambda s: None)
    assert str(e.value) == (
        f"--out {tmp_path / 'o'} already holds another run (its config.yaml differs: "
        f"epochs: 2 -> 3, lr: 0.05 -> 0.1); give this run another --out (e.g. --out "
        f"{tmp_path / 'o-3'}), or pass --overwrite to replace that one"
    )
    with pytest.raises(RunDirError, match=r"epochs: 2 -> 3.*lr: 0.05 -> 0.1"):
        run_train(changed, resume=True, log=lambda s: None)
    out = run_train(changed, overwrite=True, log=lambda s: None)
    assert out["epochs_run"] == 3


def test_checkpoint_from_other_class_count_is_refused(tmp_path, monkeypatch):
    from rifle.models import create_model
    from rifle.train.checkpoint import load_checkpoint

    c = cfg(tmp_path, "k", epochs=1, method="finetune")
    run_train(c, log=lambda s: None)
    with pytest.raises(CheckpointError, match="num_classes"):
        load_checkpoint(tmp_path / "k", create_model("tiny_cnn", 3), {"num_classes": 3})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(tmp_path / "k", create_model("tiny_cnn", 3), {})


def test_state_file_is_loaded_weights_only(tmp_path):
    # a state.pt holding an arbitrary Python object must be refused, not unpickled
    import pickle

    from rifle.train.checkpoint import STATE, load_checkpoint
    from rifle.models import create_model

    c = cfg(tmp_path, "w", epochs=1, method="finetune")
    run_train(c, log=lambda s: None)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "w" / STATE, "wb") as f:
        pickle.dump({"epoch": 0, "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path / "w", create_model("tiny_cnn", 10), {})


def test_prefetch_workers_change_nothing(tmp_path):
    run_train(cfg(tmp_path, "w0", epochs=2, reinits=1), log=lambda s: None)
    run_train(cfg(tmp_path, "w2", epochs=2, reinits=1, workers=2), log=lambda s: None)
    assert metrics(tmp_path / "w0") == metrics(tmp_path / "w2")


class NoBatchNorm(nn.Module):
    """conv-relu-conv-relu-pool-fc: every sample's gradient is independent of the rest of the batch."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, num_classes)
        self.rifle_preprocessing = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
        self.rifle_pretrained_source = None

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_grad_accumulation_equals_the_full_batch_without_batchnorm(tmp_path, monkeypatch):
    import rifle.build as build

    monkeypatch.setattr(build, "create_model", lambda name, n, **kw: NoBatchNorm(n))
    # 243 training images = 3 batches of 64 + one of 51 (micro-batches of 26 + 25: unequal weights)
    runs = {
        ga: run_train(
            cfg(tmp_path, f"ga{ga}", method="finetune", epochs=2, train_fraction=0.2, lr=0.1, grad_accum=ga),
            log=lambda s: None,
        )
        for ga in (1, 2, 4)
    }
    from rifle.core.seeding import derive_seed

    torch.manual_seed(derive_seed(0, "model"))  # as run_train: the weights before training
    start = NoBatchNorm(10).state_dict()
    w = {ga: weights(tmp_path / f"ga{ga}") for ga in runs}
    for k in start:
        moved = float((w[1][k] - start[k]).abs().max())
        assert moved > 1e-3, k  # 8 SGD steps moved every tensor far more than the tolerance below
        for ga in (2, 4):  # the gradient of the mean over 64 = weighted sum over micro-batches
            assert torch.allclose(w[ga][k], w[1][k], rtol=0, atol=1e-6), (k, ga)
    m1 = metrics(tmp_path / "ga1")
    for ga in (2, 4):
        for a, b in zip(m1, metrics(tmp_path / f"ga{ga}")):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
            assert b["test_acc"] == a["test_acc"]


def test_grad_accumulation_with_batchnorm_normalises_each_micro_batch(tmp_path):
    # BatchNorm in training mode normalises with the micro-batch's statistics and updates its running
    # statistics once per micro-batch: accumulation is NOT the full batch here (docs/guide.md §3);
    # the counters show it, and the weights differ beyond rounding
    kw = dict(method="finetune", epochs=1, train_fraction=0.2)
    run_train(cfg(tmp_path, "bn1", **kw), log=lambda s: None)
    run_train(cfg(tmp_path, "bn2", grad_accum=2, **kw), log=lambda s: None)
    w1, w2 = weights(tmp_path / "bn1"), weights(tmp_path / "bn2")
    counters = [k for k in w1 if k.endswith("num_batches_tracked")]
    assert len(counters) == 9
    for k in counters:  # 4 steps = 4 forwards, or 8 micro-batch forwards
        assert (int(w1[k]), int(w2[k])) == (4, 8), k
    assert float((w1["stem.0.weight"] - w2["stem.0.weight"]).abs().max()) > 1e-4


def test_bf16_autocast_trains_like_float32(tmp_path):
    kw = dict(method="finetune", epochs=3)
    run_train(cfg(tmp_path, "fp32", **kw), log=lambda s: None)
    bf = run_train(cfg(tmp_path, "bf16", amp="bf16", **kw), log=lambda s: None)
    fp, half = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")
    assert [r["train_loss"] for r in half] != [r["train_loss"] for r in fp]  # bf16 really ran
    for a, b in zip(fp, half):  # measured: |diff| <= 0.016 per epoch (loss 2.27 -> 1.59)
        assert abs(b["train_loss"] - a["train_loss"]) < 0.05, (a["train_loss"], b["train_loss"])
    assert half[-1]["train_loss"] < 0.8 * half[0]["train_loss"]  # it learns (measured ratio 0.70)
    assert bf["final_test_acc"] > 0.4  # 10 classes: chance is 0.1 (measured 0.56, fp32 0.68)


def test_prefetch_propagates_errors():
    from rifle.data.prefetch import prefetch

    def broken():
        yield torch.zeros(1), torch.zeros(1)
        raise RuntimeError("bad batch")

    it = prefetch(broken(), workers=1)
    next(it)
    with pytest.raises(RuntimeError, match="bad batch"):
        next(it)


def test_test_split_evaluated_only_where_a_reported_number_needs_it(tmp_path, monkeypatch):
    """--eval-test needed (default): the test split on the last epoch's model and, after it, on the copy
    kept from the best-validation epoch (the latest new best or tie); every reported number, the
    predictions and the training are those of --eval-test every, which evaluates it at every epoch. A
    run interrupted after the best epoch keeps the copy in its checkpoint and resumes to the same."""
    import numpy as np

    from rifle.train import Trainer

    calls = []
    original = Trainer.evaluate

    def evaluate(self, ds):
        calls.append("test" if ds is self.data.test else "val")
        return original(self, ds)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    run = dict(epochs=6, train_fraction=0.3)  # validation peaks at epoch 2, before the re-init at 3
    every = run_train(cfg(tmp_path, "every", eval_test="every", **run), log=lambda s: None)
    assert calls.count("test") == 6
    calls.clear()
    needed = run_train(cfg(tmp_path, "needed", **run), log=lambda s: None)
    m_every, m_needed = metrics(tmp_path / "every"), metrics(tmp_path / "needed")
    vals = [r["val_acc"] for r in m_every]  # hand rule on the full run's curve: the latest maximum
    best = max(e for e, v in enumerate(vals) if v == max(vals))
    assert best < 5, "the copy is only used when the best-validation epoch is not the last: change the run"
    assert [r["test_acc"] is not None for r in m_needed] == [e in (best, 5) for e in range(6)]
    assert calls.count("test") == 2 and calls.count("val") == 6
    for a, b in zip(m_every, m_needed):  # training and validation identical; test where measured
        assert {k: v for k, v in a.items() if not k.startswith("test_")} == {
            k: v for k, v in b.items() if not k.startswith("test_")
        }
        assert (b["test_acc"], b["test_loss"]) in ((None, None), (a["test_acc"], a["test_loss"]))
    for key in ("final_test_acc", "test_acc_at_best_val", "best_val_epoch", "best_val_acc"):
        assert needed[key] == every[key], key
    pa, pb = np.load(tmp_path / "every" / "predictions.npz"), np.load(tmp_path / "needed" / "predictions.npz")
    assert sorted(pa.files) == sorted(pb.files) and all(np.array_equal(pa[k], pb[k]) for k in pa.files)
    wa, wb = weights(tmp_path / "every"), weights(tmp_path / "needed")  # the final model put back
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    with interrupted_at_epoch(best + 1), pytest.raises(KeyboardInterrupt):
        run_train(cfg(tmp_path, "split", **run), log=lambda s: None)
    state = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert state["best_copy"]["epoch"] == best
    resumed = run_train(cfg(tmp_path, "split", **run), resume=True, log=lambda s: None)
    assert metrics(tmp_path / "split") == m_needed
    assert {k: resumed[k] for k in ("final_test_acc", "test_acc_at_best_val")} == {
        k: needed[k] for k in ("final_test_acc", "test_acc_at_best_val")
    }
    pc = np.load(tmp_path / "split" / "predictions.npz")
    assert all(np.array_equal(pc[k], pb[k]) for k in pb.files)
    assert "best_copy" not in torch.load(tmp_path / "split" / "state.pt", weights_only=True)
