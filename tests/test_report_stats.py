"""`rifle report`'s statistics (issue 21): the two-level bootstrap against a naive loop, the sign test,
validation vs test, per-class recall, the detectable difference, and the decision section on a
synthetic grid folder (clear gain, null result, weak comparison, runs older than predictions.npz)."""

import json
import math
import re
import warnings

import numpy as np
import pytest
import yaml

from rifle.core.verdict import verdict
from rifle.experiments.collect import collect, steps_after_reinits
from rifle.experiments.report import write_report
from rifle.experiments.stats import (
    bootstrap_paired,
    min_detectable_difference,
    paired_t_power,
    per_class,
    seeds_needed,
    sign_test,
)


# ------------------------------------------------------------------------------------------ bootstrap
def naive_bootstrap(diffs, b, confidence=0.95, seed=0):
    """The docstring's draw order, one number at a time."""
    rng = np.random.default_rng(seed)
    s_count, big = len(diffs), max(len(x) for x in diffs)
    picks = [[min(int(rng.random() * s_count), s_count - 1) for _ in range(s_count)] for _ in range(b)]
    means = []
    for r in range(b):
        total = 0.0
        for j in range(s_count):
            x = diffs[picks[r][j]]
            n = len(x)
            v = [rng.random() for _ in range(big)]
            total += sum(x[min(int(u * n), n - 1)] for u in v[:n]) / n
        means.append(total / s_count)
    lo, hi = np.percentile(means, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(lo), float(hi)


DIFFS = [[1, 0, 0, -1, 1], [0, 0, 1, 0, 0], [-1, 0, 0, 0, 1]]


def test_bootstrap_equals_the_naive_loop_exactly():
    got = bootstrap_paired(DIFFS, b=300)
    assert got == naive_bootstrap(DIFFS, 300)
    assert got[0] < 0.2 < got[1]  # the mean difference of the data, 3/15
    assert bootstrap_paired(DIFFS, b=300, chunk=7) == got  # blocks draw the same numbers
    ragged = [[1, 1, 0, -1], [0, 1, 1, 0, 0, 1], [-1, 0, 0, 0, 1]]  # seeds of different sizes
    assert bootstrap_paired(ragged, b=200, confidence=0.9) == naive_bootstrap(ragged, 200, 0.9)
    assert bootstrap_paired(DIFFS, b=300, seed=1) != got  # the generator's seed matters


def test_bootstrap_degenerate_cases():
    assert bootstrap_paired([[0] * 7, [0] * 7, [0] * 7]) == (0.0, 0.0)  # identical methods
    assert bootstrap_paired([[1] * 9, [1] * 9]) == (1.0, 1.0)  # a constant per-image difference
    assert bootstrap_paired([[-1] * 4]) == (-1.0, -1.0)
    assert all(math.isnan(x) for x in bootstrap_paired([]))
    # two seeds, all-or-nothing: each resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4
    lo, hi = bootstrap_paired([[1] * 3, [0] * 3], b=4000)
    assert (lo, hi) == (0.0, 1.0)


def test_bootstrap_at_the_studies_size():
    rng = np.random.default_rng(5)
    diffs = [rng.choice([-1, 0, 0, 0, 0, 1], size=656) for _ in range(10)]
    lo, hi = bootstrap_paired(diffs)  # 10,000 x 10 seeds x 656 images (ELPV's test split)
    assert lo < np.mean([d.mean() for d in diffs]) < hi


# ------------------------------------------------------------------------------------------ sign test, power
def test_sign_test_by_hand():
    five = sign_test([0.01, 0.02, 0.005, 0.03, 0.01])
    assert (five.positive, five.negative, five.ties, five.p) == (5, 0, 0, pytest.approx(2 / 32))
    # 3 up, 1 down, 1 tie dropped: P(X <= 1 or X >= 3 | n=4) = (1 + 4 + 4 + 1) / 16
    s = sign_test([0.1, -0.2, 0.0, 0.3, 0.05])
    assert (s.positive, s.negative, s.ties, s.p) == (3, 1, 1, pytest.approx(10 / 16))
    assert math.isnan(sign_test([0.0, 0.0]).p) and sign_test([0, 0]).ties == 2


def test_min_detectable_difference_and_seeds_needed():
    from scipy import integrate, stats

    def power(delta, sd, n):  # the paired t-test's power, by integrating over its chi-square part
        df, nc, tc = n - 1, delta * math.sqrt(n) / sd, stats.t.ppf(0.975, n - 1)

        def f(v):
            s = tc * math.sqrt(v / df)
            return (stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc)) * stats.chi2.pdf(v, df)

        return integrate.quad(f, 0, math.inf, limit=200)[0]

    for n, sd in ((5, 0.01), (10, 0.02), (2, 0.005)):
        mde = min_detectable_difference(sd, n)
        assert power(mde, sd, n) == pytest.approx(0.8, abs=1e-6)
        shortcut = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
        assert shortcut <= mde <= 1.1 * shortcut or n == 2
    assert min_detectable_difference(0.01, 10) / 0.01 == pytest.approx(0.996, abs=1e-3)  # d_z for n = 10
    n = seeds_needed(0.01, 0.02)
    assert paired_t_power(0.01, 0.02, n) >= 0.8 > paired_t_power(0.01, 0.02, n - 1)
    assert math.isnan(min_detectable_difference(0.01, 1)) and min_detectable_difference(0.0, 4) == 0.0


def test_per_class_recall_and_predicted_share_by_hand():
    recall, share = per_class([0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 2], 3)
    assert recall == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert share == pytest.approx([4 / 6, 2 / 6, 0.0])
    recall, _ = per_class([0, 1], [0, 0], 2)
    assert recall[0] == 0.5 and math.isnan(recall[1])  # no test image of class 1


# ------------------------------------------------------------------------------------------ synthetic grid
def _correct(n, k, offset=0):
    """Predictions of a 2-class split of n images (labels 0, 1, 0, 1, ...) right on exactly k images."""
    y = np.arange(n) % 2
    p = y.copy()
    wrong = (np.arange(n) + offset) % n >= k
    p[wrong] = 1 - y[wrong]
    return p.astype(np.int16), y.astype(np.int16)


def fake_run(
    root,
    cell,
    label,
    seed,
    *,
    test_k,
    val_k,
    n_test=200,
    n_val=200,
    predictions=True,
    rifle=False,
    n_train=4000,
    epochs=4,
    batch=32,
    data_warnings=(),
    diagnoses=(),
    offset=0,
    extra=None,
):
    """A complete run folder: the test split right on ``test_k`` images (final and at best val), the
    validation split on ``val_k``."""
    p = root / cell / "m" / "frac1" / label / f"seed{seed}"
    p.mkdir(parents=True)
    tp, ty = _correct(n_test, test_k, offset)
    vp, vy = _correct(n_val, val_k, offset)
    rc = {"reinits": 1, "granularity": "epoch", "guard": None, "guard_steps": None, "min_steps_after": 100}
    config = {
        "method": "rifle" if rifle else "finetune",
        "reinits": 1,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch,
        "grad_accum": 1,
        "lr": 0.01,
        "resolved_methods": {"rifle": rc} if rifle else {"finetune": {}},
    }
    (p / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "complete": True,
        "final_test_acc": test_k / n_test,
        "test_acc_at_best_val": test_k / n_test,
        "final_val_acc": val_k / n_val,
        "best_val_acc": val_k / n_val,
        "classes": ["functional", "defective"],
        "data_info": {
            "sizes": {"train": n_train, "val": n_val, "test": n_test},
            "warnings": list(data_warnings),
        },
        "methods": {"rifle": rc} if rifle else {"finetune": {}},
        "reinit_epochs": [epochs // 2] if rifle else [],
        "reinit_epochs_seen": [epochs // 2] if rifle else [],
    }
    if rifle:
        summary["rifle_diagnosis"] = [{**d, "verdict": verdict(d)} for d in diagnoses]
    summary.update(extra or {})
    (p / "summary.json").write_text(json.dumps(summary))
    if predictions:
        np.savez_compressed(
            p / "predictions.npz",
            test_final=tp,
            test_best_val=tp,
            test_labels=ty,
            val_final=vp,
            val_best_val=vp,
            val_labels=vy,
        )
    return p


DELIVERED = {"index": 1, "unit": "epoch", "at": 2, "train_loss_before": 0.05, "train_acc_before": 0.99,
             "grad_ratio": 1.4, "head_signal_ratio": None}  # fmt: skip
NOT_CONVERGED = {"index": 1, "unit": "epoch", "at": 2, "train_loss_before": 0.9, "train_acc_before": 0.6,
                 "grad_ratio": 0.7, "head_signal_ratio": None}  # fmt: skip
TINY_VAL = (
    "the validation split (carved 10% stratified seed {s}) has only 5 images: validation accuracy moves in "
    "steps of 20 points, so the epoch it picks (best_val_epoch, test_acc_at_best_val) is largely chance"
)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    for s in range(5):
        # gain: +5 points on test and on validation in every seed
        fake_run(root, "gain", "finetune", s, test_k=140, val_k=140)
        fake_run(root, "gain", "rifle-K1", s, test_k=150, val_k=150, rifle=True, diagnoses=[DELIVERED])
        # null: the differences scatter around 0 (+-3 images); K2: test up, validation down
        d = [3, -3, 6, -6, 0][s]
        fake_run(root, "null", "finetune", s, test_k=140, val_k=140)
        fake_run(root, "null", "rifle-K1", s, test_k=140 + d, val_k=140 - d // 3 * 2, rifle=True, offset=s)
        fake_run(root, "null", "rifle-K2", s, test_k=146, val_k=134, rifle=True, diagnoses=[NOT_CONVERGED])
    for s in range(3):
        # weak: 40 training images in batches of 32 (2 steps per epoch), a 5-image validation split
        kw = dict(n_val=5, n_train=40, data_warnings=[TINY_VAL.format(s=s)])
        fake_run(root, "weak", "finetune", s, test_k=100, val_k=3, **kw)
        fake_run(root, "weak", "rifle-K1", s, test_k=70, val_k=2, rifle=True, diagnoses=[NOT_CONVERGED], **kw)
        # same: a converged-trigger run that never fired gives the baseline's accuracies
        never = {
            "rifle_trigger": {
                "trigger": "converged",
                "fired": [],
                "reason": "train accuracy never reached 0.97 (best 0.79 at epoch 17)",
            }
        }
        fake_run(root, "same", "finetune", s, test_k=120 + s, val_k=110)
        fake_run(root, "same", "rifle-K1", s, test_k=120 + s, val_k=110, rifle=True, extra=never)
        # old: runs from before predictions.npz
        fake_run(root, "old", "finetune", s, test_k=100 + s, val_k=100, predictions=False)
        fake_run(root, "old", "rifle-K1", s, test_k=104, val_k=101 + s, rifle=True, predictions=False)
    failed = root / "weak/m/frac1/rifle-K1/seed3"
    failed.mkdir()
    (failed / "error.txt").write_text(
        "CheckpointError: the weights after epoch 2 are non-finite: training diverged\n"
    )
    (root / "weak/m/frac1/finetune/seed3").mkdir()
    (root / "weak/m/frac1/finetune/seed3/config.yaml").write_text("method: finetune\n")
    res = write_report(root, plots=False, bootstrap=2000)
    rows = {(r["dataset"], r["method"]): r for r in res["rows"]}
    dec = {(d["dataset"], d["method"]): d for d in res["decisions"]}
    return dict(root=root, res=res, rows=rows, dec=dec, md=(root / "results.md").read_text())


def _file_diffs(root, cell, seeds, arr="test_final", labels="test_labels"):
    out = []
    for s in seeds:
        z = {
            lab: np.load(root / f"{cell}/m/frac1/{lab}/seed{s}/predictions.npz")
            for lab in ("rifle-K1", "finetune")
        }
        out.append(
            (z["rifle-K1"][arr] == z["rifle-K1"][labels]).astype(int)
            - (z["finetune"][arr] == z["finetune"][labels]).astype(int)
        )
    return out


def test_report_bootstrap_and_sign_test_columns(grid):
    rows, root = grid["rows"], grid["root"]
    gain = rows["gain", "rifle-K1"]
    assert gain["diff_final_mean"] == pytest.approx(0.05)
    # the report's bootstrap is the documented one on the per-image differences of the run files
    assert (gain["diff_final_boot_low"], gain["diff_final_boot_high"]) == bootstrap_paired(
        _file_diffs(root, "gain", range(5)), b=2000
    )
    assert 0 < gain["diff_final_boot_low"] < 0.05 < gain["diff_final_boot_high"]  # 10 images of 200 per seed
    assert (gain["diff_val_final_boot_low"], gain["diff_val_final_boot_high"]) == bootstrap_paired(
        _file_diffs(root, "gain", range(5), "val_final", "val_labels"), b=2000
    )
    assert (gain["diff_final_sign_pos"], gain["diff_final_sign_neg"], gain["diff_final_p_sign"]) == (
        5,
        0,
        pytest.approx(0.0625),
    )
    assert gain["diff_val_final_mean"] == pytest.approx(0.05) and not gain["sign_flag_final"]
    null = rows["null", "rifle-K1"]
    assert (null["diff_final_boot_low"], null["diff_final_boot_high"]) == bootstrap_paired(
        _file_diffs(root, "null", range(5)), b=2000
    )
    assert null["diff_final_boot_low"] < 0 < null["diff_final_boot_high"]
    assert (null["diff_final_sign_pos"], null["diff_final_sign_neg"], null["diff_final_sign_ties"]) == (
        2,
        2,
        1,
    )
    k2 = rows["null", "rifle-K2"]
    assert k2["sign_flag_final"] and k2["sign_flag_bestval"]  # test +6 images, validation -6
    csv = (root / "results.csv").read_text().splitlines()
    head = csv[0].split(",")
    assert {"diff_final_boot_low", "diff_val_final_mean", "diff_final_p_sign", "sign_flag_final"} <= set(head)
    k2_line = next(line for line in csv if line.startswith("null,m,1,rifle-K2,"))
    assert dict(zip(head, k2_line.split(",")))["sign_flag_final"] == "True"


def test_report_old_runs_say_why_the_bootstrap_is_missing(grid):
    old = grid["rows"]["old", "rifle-K1"]
    assert math.isnan(old["diff_final_boot_low"]) and math.isfinite(old["diff_final_ci_low"])
    assert old["diff_final_boot_note"] == "no predictions.npz (runs older than the file): 6 of 6 runs"
    assert old["diff_val_final_mean"] == pytest.approx(0.01)  # validation from summary.json still
    md = grid["md"]
    assert "Bootstrap n/a where: no predictions.npz (runs older than the file): 6 of 6 runs." in md
    assert (
        "| rifle-K1 | final test | 3 | +1.50 | [+0.26, +2.74], p=0.0351 | n/a | 3/0/0, p=0.25 | agree |" in md
    )


def test_report_per_class_table(grid):
    (row,) = [r for r in grid["res"]["class_rows"] if r["dataset"] == "gain" and r["method"] == "rifle-K1"]
    # labels 0,1,0,1,...; right on the first 150 of 200: recall 75/100 per class, predictions flipped
    # elsewhere so the shares stay 1/2
    assert row["classes"] == ["functional", "defective"] and row["n"] == 5
    assert row["recall"] == pytest.approx([0.75, 0.75]) and row["predicted"] == pytest.approx([0.5, 0.5])
    assert "| class | test labels | finetune (n=5) | rifle-K1 (n=5) |" in grid["md"]
    assert "| defective | 50.0 | 70.0 / 50.0 | 75.0 / 50.0 |" in grid["md"]  # finetune: 140 of 200
    assert not [r for r in grid["res"]["class_rows"] if r["dataset"] == "old"]  # no predictions


def test_decision_section_plain_words(grid):
    dec, md = grid["dec"], grid["md"]
    # the report ends with the decisions, after every cell and the lists of failed / unfinished runs
    start = md.index("## Decision: does a method beat finetune?")
    assert start > max(md.index("## weak / m"), md.index("## Failed runs"), md.index("## Unfinished runs"))
    assert "\n## " not in md[start + 3 :]
    gain = dec["gain", "rifle-K1"]
    assert gain["conclusion"] == (
        "evidence of a gain: rifle-K1 is +5.00 points on validation and +5.00 on test, both intervals "
        "exclude 0."
    )
    assert gain["warnings"] == [] and gain["verdicts"] == {"head converged, backprop in depth delivered": 5}
    assert "5 × head converged, backprop in depth delivered" in md
    assert gain["majority"] == {"class": "functional", "labels": 0.5, "method": 0.5, "baseline": 0.5}
    assert dec["old", "rifle-K1"]["majority"] is None  # no predictions
    assert "- majority class `functional` (50.0% of the test labels): predicted for 50.0%" in md
    null = dec["null", "rifle-K1"]
    need = seeds_needed(0.01, grid["rows"]["null", "rifle-K1"]["diff_val_final_std"])
    assert null["conclusion"].startswith("no evidence either way on validation; about ")
    assert (
        f"about {need - 5} more seeds would detect a 1-point difference on validation" in null["conclusion"]
    )
    assert dec["null", "rifle-K2"]["conclusion"] == (
        "validation (-3.00) and test (+3.00) disagree in sign: do not select on this."
    )
    weak = dec["weak", "rifle-K1"]
    assert weak["conclusion"] == (  # validation: t [-20, -20] but bootstrap [-40, 0]: both must exclude 0
        "weak comparison (see the warnings): no evidence either way on validation; test alone shows -15.00 "
        "points, its interval excluding 0, which is not a basis for selection."
    )
    text = "\n".join(weak["warnings"])
    assert (
        "re-convergence period below --min-steps-after: 3 of 3 rifle-K1 runs (seeds 0 1 2) have as few as 4 "
        "optimizer steps after a re-init, fewer than 100" in text
    )
    assert "(carved 10% stratified seed …) has only 5 images" in text and "(6 of 6 runs)" in text
    assert "a diverged run, not counted: `weak/m/frac1/rifle-K1/seed3`" in text
    assert "an incomplete run, not counted: `weak/m/frac1/finetune/seed3` (no summary.json)" in text
    assert weak["verdicts"] == {
        "head not converged, within fine-tuning's own decay at a boundary: no deeper backprop than without "
        "the re-init": 3
    }
    assert "- **warnings** (each weakens this comparison):" in md
    same = dec["same", "rifle-K1"]
    assert (
        same["conclusion"] == "rifle-K1 gave exactly finetune's accuracies in every seed: nothing to choose."
    )
    assert same["unfired"] == {"train accuracy never reached 0.97": 3}
    assert "3 run(s) fired no re-init: train accuracy never reached 0.97" in md
    assert dec["gain", "rifle-K1"]["mde_final"] == 0.0  # no spread: any difference is detected
    # the detectable difference, from the observed SD of the paired differences
    sd = grid["rows"]["null", "rifle-K1"]["diff_final_std"]
    assert null["mde_final"] == pytest.approx(min_detectable_difference(sd, 5))
    assert f"{100 * null['mde_final']:.2f} points on final test" in md
    assert not re.search(r"select(ed)? on test\b(?! never)", gain["conclusion"])


def test_steps_after_reinit_matches_the_runs_own_warning(tmp_path):
    """The report recomputes what `--min-steps-after` warned about (the run records the warning nowhere)."""
    from conftest import rifle_cfg

    from rifle.run import run_train

    cfg = rifle_cfg(tmp_path, epochs=2, train_fraction=0.1, min_steps_after=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_train(cfg, log=lambda s: None)
    (msg,) = [str(w.message) for w in caught if "min-steps-after" in str(w.message)]
    want = int(re.search(r"have (\d+) optimizer step", msg).group(1))
    (run,) = collect(tmp_path).runs
    assert min(steps_after_reinits(summary, run.config)) == want
    # step granularity: the schedule is rebuilt over optimizer steps
    cfg2 = rifle_cfg(
        tmp_path, name="steps", epochs=2, train_fraction=0.1, min_steps_after=100, reinit_granularity="step"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary2 = run_train(cfg2, log=lambda s: None)
    (msg,) = [str(w.message) for w in caught if "min-steps-after" in str(w.message)]
    want = int(re.search(r"have (\d+) optimizer step", msg).group(1))
    run2 = next(r for r in collect(tmp_path).runs if r.path.name == "steps")
    assert min(steps_after_reinits(summary2, run2.config)) == want


def test_predictions_that_do_not_match_summary_or_each_other_are_not_bootstrapped(tmp_path):
    for s in range(2):
        fake_run(tmp_path, "c", "finetune", s, test_k=100, val_k=100)
        fake_run(tmp_path, "c", "rifle-K1", s, test_k=110, val_k=100, rifle=True)
    p = tmp_path / "c/m/frac1/rifle-K1/seed1/summary.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "final_test_acc": 0.56}))  # 112 of 200, not 110
    z = dict(np.load(tmp_path / "c/m/frac1/finetune/seed0/predictions.npz"))
    z["val_labels"] = 1 - z["val_labels"]  # another validation split than rifle-K1 seed 0's
    z["val_final"] = 1 - z["val_final"]  # (its accuracy unchanged)
    np.savez(tmp_path / "c/m/frac1/finetune/seed0/predictions.npz", **z)
    (row,) = [
        r for r in write_report(tmp_path, plots=False, bootstrap=100)["rows"] if r["method"] == "rifle-K1"
    ]
    assert math.isnan(row["diff_final_boot_low"])
    assert row["diff_final_boot_note"] == (
        "predictions.npz's test_final does not give summary.json's final_test_acc: rifle-K1/seed1"
    )
    assert math.isfinite(row["diff_bestval_boot_low"])  # test_best_val still matches its accuracy
    assert (
        row["diff_val_final_boot_note"] == "the two runs' labels differ (not paired image by image): seed 0"
    )


def test_the_cli_prints_each_decision_and_its_warnings(grid, capsys):
    from rifle.cli import main

    assert main(["report", str(grid["root"]), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert (
        "gain / m / train fraction 1: rifle-K1 vs finetune: evidence of a gain: rifle-K1 is +5.00 points on "
        "validation and +5.00 on test, both intervals exclude 0." in out
    )
    weak = next(line for line in out.splitlines() if line.startswith("weak / m"))
    assert "rifle-K1 vs finetune" in weak
    assert any(line.startswith("  weak: ") and "5 images" in line for line in out.splitlines()), out
