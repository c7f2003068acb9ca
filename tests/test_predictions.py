"""predictions.npz: per-image predicted classes of every run, consistent with summary.json and metrics.jsonl,
kept across an interruption and --resume."""

import shutil

import numpy as np
import pytest
import torch

from conftest import interrupted_at_epoch, metrics, rifle_cfg as cfg
from rifle.run import run_train
from rifle.train.checkpoint import STATE

KEYS = {"test_final", "test_best_val", "test_labels", "val_final", "val_best_val", "val_labels"}


def predictions(path):
    with np.load(path / "predictions.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def acc(pred, labels):
    return (pred == labels).sum() / len(labels)  # summary's correct / n, the same float division


def check_against_summary(p, summary, rows):
    """Accuracies from the arrays equal summary.json's and metrics.jsonl's exactly (==)."""
    assert acc(p["test_final"], p["test_labels"]) == summary["final_test_acc"] == rows[-1]["test_acc"]
    assert acc(p["val_final"], p["val_labels"]) == summary["final_val_acc"] == rows[-1]["val_acc"]
    best = rows[summary["best_val_epoch"]]
    assert acc(p["val_best_val"], p["val_labels"]) == summary["best_val_acc"] == best["val_acc"]
    assert acc(p["test_best_val"], p["test_labels"]) == summary["test_acc_at_best_val"] == best["test_acc"]


def test_predictions_match_summary_and_best_epoch_survives_resume(tmp_path):
    # three re-inits in four epochs: validation peaks at epoch 1, so best-val and final predictions differ
    kw = dict(epochs=4, reinits=3)
    full = run_train(cfg(tmp_path, "full", **kw), log=lambda s: None)
    assert full["best_val_epoch"] == 1 and full["epochs_run"] == 4
    p = predictions(tmp_path / "full")
    assert set(p) == KEYS
    assert all(a.dtype == np.int16 for a in p.values())
    n_test, n_val = full["data_info"]["sizes"]["test"], full["data_info"]["sizes"]["val"]
    assert {k: len(a) for k, a in p.items()} == {
        **{f"test_{s}": n_test for s in ("final", "best_val", "labels")},
        **{f"val_{s}": n_val for s in ("final", "best_val", "labels")},
    }
    rows = metrics(tmp_path / "full")
    check_against_summary(p, full, rows)
    assert not np.array_equal(p["test_best_val"], p["test_final"])
    assert p["test_labels"].min() >= 0 and p["test_labels"].max() < len(full["classes"])

    # interrupted when epoch 3 starts (best epoch 1 is two checkpoints back), then resumed
    with interrupted_at_epoch(3), pytest.raises(KeyboardInterrupt):
        run_train(cfg(tmp_path, "split", **kw), log=lambda s: None)
    assert not (tmp_path / "split" / "predictions.npz").exists()
    stripped = tmp_path / "old_state"  # a checkpoint from before predictions (and model copies) were kept
    shutil.copytree(tmp_path / "split", stripped)
    state = torch.load(stripped / STATE, weights_only=True)
    del state["predictions"], state["best_copy"]  # the copy of best epoch 1's model (--eval-test needed)
    torch.save(state, stripped / STATE)

    run_train(cfg(tmp_path, "split", **kw), resume=True, log=lambda s: None)
    q = predictions(tmp_path / "split")
    assert set(q) == KEYS
    assert all(np.array_equal(p[k], q[k]) and q[k].dtype == p[k].dtype for k in KEYS)

    # an old state has no best-validation predictions from before the crash: those keys are left out
    run_train(cfg(tmp_path, "old_state", **kw), resume=True, log=lambda s: None)
    r = predictions(stripped)
    assert set(r) == KEYS - {"test_best_val", "val_best_val"}
    assert all(np.array_equal(p[k], r[k]) for k in r)


def test_no_validation_split_writes_only_test_keys(tmp_path):
    s = run_train(cfg(tmp_path, "noval", epochs=2, val_fraction=0.0), log=lambda s: None)
    assert s["best_val_epoch"] is None
    p = predictions(tmp_path / "noval")
    assert set(p) == {"test_final", "test_labels"}  # no best-validation epoch, as test_acc_at_best_val
    assert acc(p["test_final"], p["test_labels"]) == s["final_test_acc"]
    assert len(p["test_final"]) == s["data_info"]["sizes"]["test"]


def test_label_noise_val_labels_are_the_noisy_ones(tmp_path):
    """val_labels are the labels validation accuracy is computed against: noisy under --label-noise (the
    validation split is carved from the noisy training split); the test labels stay clean."""
    s = run_train(cfg(tmp_path, "noisy", epochs=2, label_noise=0.4), log=lambda s: None)
    p = predictions(tmp_path / "noisy")
    assert acc(p["val_final"], p["val_labels"]) == s["final_val_acc"]
    assert acc(p["test_final"], p["test_labels"]) == s["final_test_acc"]
    clean = run_train(cfg(tmp_path, "clean", epochs=2), log=lambda s: None)
    q = predictions(tmp_path / "clean")
    assert acc(q["val_final"], q["val_labels"]) == clean["final_val_acc"]
    assert np.array_equal(p["test_labels"], q["test_labels"])
    assert not np.array_equal(p["val_labels"], q["val_labels"])
