"""Grid runner (expansion, labels, locks, resume, workers), statistics and report against hand values."""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rifle.experiments import grid as G
from rifle.experiments import locks as L
from rifle.experiments import runner as R
from rifle.experiments.collect import collect
from rifle.experiments.report import write_report
from rifle.experiments.stats import mean_std, paired_difference, t_interval

VOLATILE = {"seconds", "images_per_s"}
TINY = {
    "datasets": ["digits"],
    "models": ["tiny_cnn"],
    "methods": [{"name": "finetune"}, {"name": "rifle", "reinits": 1}],
    "seeds": [0, 1],
    "train_fractions": [0.3],
    "train": {"epochs": 2, "image_size": 16, "batch_size": 32, "lr": 0.05, "min_steps_after": 0},
}


# ------------------------------------------------------------------------------------------ statistics
def test_mean_std_and_t_interval_by_hand():
    m, sd, n = mean_std([0.80, 0.82, 0.85])
    assert (n, m) == (3, pytest.approx(0.823333333, abs=1e-9))
    assert sd == pytest.approx(math.sqrt(((0.8 - m) ** 2 + (0.82 - m) ** 2 + (0.85 - m) ** 2) / 2))
    assert math.isnan(mean_std([0.5])[1]) and mean_std([])[2] == 0
    # df = 1: t_{0.975} = tan(0.475 pi) = 12.7062 (Cauchy quantile)
    lo, hi = t_interval([1.0, 3.0])
    assert (lo, hi) == (
        pytest.approx(2 - 12.706205 * math.sqrt(2) / math.sqrt(2), abs=1e-5),
        pytest.approx(2 + 12.706205, abs=1e-5),
    )


def test_paired_difference_by_hand():
    a, b = [0.80, 0.82, 0.85], [0.78, 0.81, 0.80]
    d = paired_difference(a, b)
    diffs = [0.02, 0.01, 0.05]
    mean, sd = sum(diffs) / 3, statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(3))
    # df = 2 closed forms: two-sided p = 1 - |t| / sqrt(2 + t^2); t_{0.975, 2} = sqrt(2 * .95^2 / (1 - .95^2))
    t_crit = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    assert t_crit == pytest.approx(4.302653, abs=1e-6)
    assert d.n == 3 and d.mean == pytest.approx(mean) and d.std == pytest.approx(sd)
    assert d.ci_low == pytest.approx(mean - t_crit * sd / math.sqrt(3))
    assert d.ci_high == pytest.approx(mean + t_crit * sd / math.sqrt(3))
    assert d.p_t == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))
    assert d.p_t == pytest.approx(0.15673, abs=1e-4)
    assert math.isnan(d.p_wilcoxon)  # n < 6
    # Wilcoxon with 6 pairs all in favour: exact two-sided p = 2 / 2^6
    w = paired_difference([1, 2, 3, 4, 5, 6.5], [0, 0, 0, 0, 0, 0])
    assert w.p_wilcoxon == pytest.approx(2 / 64)
    # degenerate: identical differences
    same = paired_difference([0.5, 0.6], [0.4, 0.5])
    assert (same.ci_low, same.ci_high, same.p_t) == (pytest.approx(0.1), pytest.approx(0.1), 0.0)
    zero = paired_difference([0.5, 0.6], [0.5, 0.6])
    assert zero.p_t == 1.0 and zero.mean == 0
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1, 2], [1])


# ------------------------------------------------------------------------------------------ grid spec
def test_grid_expansion_order_labels_and_paths(tmp_path):
    spec = {
        **TINY,
        "seeds": [0, 1],
        "train_fractions": [0.3, 1.0],
        "train": {**TINY["train"], "epochs": 4},
        "methods": [
            {"name": "finetune"},
            {"name": "rifle", "reinits": 2},
            {"name": "finetune", "reg": "l2", "weight_decay": 0.0},
            {"name": "rifle", "reinits": 1, "keep_optimizer_state": True},
            {"name": "rifle", "reinits": 1, "head_lr_restart": False, "label": "rifle-K1-plain"},
        ],
    }
    grid = G.parse_grid(spec)
    assert [e.label for e in grid.methods] == [
        "finetune",
        "rifle-K2",
        "finetune+weight-decay=0",
        "rifle-K1+keep-optimizer-state",
        "rifle-K1-plain",
    ]
    assert grid.baseline == "finetune"
    runs = G.expand(grid, tmp_path)
    assert len(runs) == 2 * 2 * 5
    assert [r.seed for r in runs] == [0] * 10 + [1] * 10  # seed-major: a partial grid is paired
    r = runs[1]
    assert r.path == tmp_path / "digits" / "tiny_cnn" / "frac0.3" / "rifle-K2" / "seed0"
    assert (r.cfg.method, r.cfg.reinits, r.cfg.epochs, r.cfg.train_fraction, r.cfg.out) == (
        "rifle",
        2,
        4,
        0.3,
        str(r.path),
    )
    assert r.cfg.extra["grid"]["label"] == "rifle-K2"
    assert runs[3].cfg.keep_optimizer_state is True and runs[2].cfg.weight_decay == 0.0
    assert runs[5].path.parts[-3] == "frac1"
    # an entry restricted to some of the grid's fractions
    only = G.parse_grid(
        {**spec, "methods": [{"name": "finetune"}, {"name": "rifle", "reinits": 1, "train_fractions": [1.0]}]}
    )
    assert [(r.label, r.fraction) for r in G.expand(only, tmp_path) if r.seed == 0] == [
        ("finetune", 0.3),
        ("finetune", 1.0),
        ("rifle-K1", 1.0),
    ]
    with pytest.raises(G.GridError, match=r"methods\[1\] \(rifle\): train_fractions \[0.5\] must be"):
        G.parse_grid({**spec, "methods": [{"name": "finetune"}, {"name": "rifle", "train_fractions": [0.5]}]})
    assert (
        G.default_label(
            {"method": "finetune", "reg": "l2sp", "trick": ["dropout"]},
            G.resolve({"method": "finetune", "reg": "l2sp", "trick": ["dropout"]}),
        )
        == "finetune+l2sp+dropout"
    )


@pytest.mark.parametrize(
    "change,needle",
    [
        (
            {"methods": [{"name": "rifle", "reinit": 2}]},
            r"methods\[0\] \(rifle\): unknown key 'reinit'.*reinits",
        ),
        ({"methods": [{"name": "finetune"}, {"name": "finetune"}]}, "both have the label 'finetune'"),
        ({"methods": [{"name": "finetune", "seed": 3}]}, "set by the grid"),
        ({"train": {"epoch": 3}}, "train: unknown key 'epoch'"),
        ({"seeds": [0, 0]}, "lists a value twice"),
        ({"datasets": []}, "'datasets' is empty"),
        ({"trains": {}}, "unknown key 'trains'.*train"),
        ({"methods": [{"name": "finetun"}]}, r"methods\[0\] \(finetun\).*unknown.*finetune"),
        (
            {"methods": [{"name": "finetune", "reg": "nope"}]},
            r"methods\[0\] \(finetune\+nope\).*--reg 'nope'",
        ),
        ({"methods": [{"name": "rifle", "reinits": 5}]}, r"rifle-K5.*reinits=5 needs 6"),
        ({"baseline": "nothing"}, "baseline 'nothing' is not a method label"),
        ({"methods": [{"name": "finetune", "label": "a/b"}]}, "label 'a/b' must use only"),
    ],
)
def test_grid_errors_name_the_entry(tmp_path, change, needle):
    with pytest.raises(G.GridError, match=needle):
        G.expand(G.parse_grid({**TINY, **change}), tmp_path)


# ------------------------------------------------------------------------------------------ locks
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_claim_and_stale_rules(tmp_path):
    run = tmp_path / "run"
    claim = L.try_claim(run)
    assert claim is not None and L.read_lock(run / L.LOCK)["pid"] == os.getpid()
    assert L.try_claim(run) is None  # held by a live process (this one)
    claim.release()
    assert not (run / L.LOCK).exists()
    # a lock whose pid is dead on this host is stale at once
    import socket

    (run / L.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "token": "x"}))
    again = L.try_claim(run)
    assert again is not None and L.read_lock(run / L.LOCK)["token"] == again.token
    again.release()
    # another host: only the heartbeat (mtime) decides
    (run / L.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    assert L.try_claim(run, stale_after=600) is None
    old = time.time() - 700
    os.utime(run / L.LOCK, (old, old))
    assert L.lock_is_stale(L.read_lock(run / L.LOCK), old, 600)
    third = L.try_claim(run, stale_after=600)
    assert third is not None
    # the heartbeat keeps a long run's lock fresh
    os.utime(run / L.LOCK, (old, old))
    third.start_heartbeat(0.05)
    time.sleep(0.3)
    assert time.time() - (run / L.LOCK).stat().st_mtime < 5
    third.release()
    assert not (run / L.LOCK).exists()


def test_lock_owner_takes_over_its_own_dead_attempt_at_once(tmp_path):
    """A Ray retry (same owner) takes over a lock from another host at once; anyone else waits."""
    run = tmp_path / "run"
    run.mkdir()
    (run / L.LOCK).write_text(json.dumps({"host": "node-b", "pid": 1, "token": "t", "owner": "ray:abc"}))
    assert L.try_claim(run, stale_after=600) is None  # no owner: heartbeat is fresh
    assert L.try_claim(run, stale_after=600, owner="ray:other") is None  # another invocation
    mine = L.try_claim(run, stale_after=600, owner="ray:abc")
    info = L.read_lock(run / L.LOCK)
    assert mine is not None and (info["owner"], info["token"], info["pid"]) == (
        "ray:abc",
        mine.token,
        os.getpid(),
    )
    mine.release()
    assert not (run / L.LOCK).exists() and not (run / (L.LOCK + ".break")).exists()


def test_runner_records_failures_loads_data_once_and_skips_done(tmp_path, monkeypatch):
    import rifle.build as build_mod
    import rifle.run as run_mod

    loads, calls = [], []

    def fake_load(cfg):
        loads.append((cfg.seed, cfg.train_fraction))
        return object()

    def fake_run(cfg, *, resume, data, log, progress):
        calls.append(Path(cfg.out).parts[-2:])
        assert resume is True and data is not None
        if cfg.method == "rifle" and cfg.seed == 1:
            raise RuntimeError("boom")
        s = {"complete": True, "final_test_acc": 0.5}
        Path(cfg.out, "summary.json").write_text(json.dumps(s))
        return s

    monkeypatch.setattr(build_mod, "load_data", fake_load)
    monkeypatch.setattr(run_mod, "run_train", fake_run)
    runs = G.expand(G.parse_grid(TINY), tmp_path)
    lines = []
    res = R.run_grid(runs, log=lines.append)
    assert loads == [(0, 0.3), (1, 0.3)]  # once per (dataset, seed, fraction)
    assert res.counts == {"done": 3, "failed": 1} and res.failed == ["digits/tiny_cnn/frac0.3/rifle-K1/seed1"]
    assert "RuntimeError: boom" in (runs[3].path / L.ERROR).read_text()
    assert any("failed" in x and "boom" in x for x in lines)
    assert not list(tmp_path.rglob(L.LOCK))
    # the same invocation (since = its start) does not retry; a new one does, and skips the done runs
    calls.clear()
    res = R.run_grid(runs, since=time.time() - 3600, log=lines.append)
    assert calls == [] and res.counts == {"skipped": 4}
    res = R.run_grid(runs, since=time.time() + 1, log=lines.append)
    assert calls == [("rifle-K1", "seed1")] and res.counts == {"skipped": 3, "failed": 1}


# ------------------------------------------------------------------------------------------ real runs
def _metrics(path):
    return [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in (path / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """The tiny grid, interrupted (Ctrl-C) in the middle of its 3rd run, then re-run."""
    from rifle.train.trainer import Trainer

    out = tmp_path_factory.mktemp("grid")
    grid = G.parse_grid(TINY)
    runs = G.expand(grid, out)
    original = Trainer.train_epoch
    epoch1 = {"n": 0}

    def interrupt_third_run(self, epoch):
        if epoch == 1:
            epoch1["n"] += 1
            if epoch1["n"] == 3:
                raise KeyboardInterrupt
        return original(self, epoch)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "train_epoch", interrupt_third_run)
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        R.run_grid(runs, log=first.append)
    mp.undo()
    stamps = {r.rel: (r.path / "summary.json").stat().st_mtime_ns for r in runs[:2]}
    import rifle.run as run_mod

    calls = []
    real = run_mod.run_train
    mp.setattr(run_mod, "run_train", lambda cfg, **kw: calls.append(cfg.out) or real(cfg, **kw))
    second: list[str] = []
    res = R.run_grid(runs, log=second.append)
    mp.undo()
    G.write_grid_copy(grid, out)
    return dict(out=out, runs=runs, first=first, second=second, stamps=stamps, calls=calls, res=res)


def test_interrupted_grid_resumes_without_recomputing(tiny_grid):
    runs, first, second = tiny_grid["runs"], tiny_grid["first"], tiny_grid["second"]
    assert [x.split()[1] for x in first[:2]] == ["done", "done"] and len(first) == 3
    assert first[2].startswith("interrupted during digits/tiny_cnn/frac0.3/finetune/seed1")
    assert not list(tiny_grid["out"].rglob(L.LOCK))  # Ctrl-C released the lock
    # finished runs untouched, run_train not even called for them
    assert {r.rel: (r.path / "summary.json").stat().st_mtime_ns for r in runs[:2]} == tiny_grid["stamps"]
    assert tiny_grid["calls"] == [str(runs[2].path), str(runs[3].path)]
    assert [x.split()[1] for x in second] == ["skipped", "skipped", "done", "done"] and "(resumed)" in second[
        2
    ]
    assert "resumed from" in (runs[2].path / "train.log").read_text()
    for r in runs:
        assert [m["epoch"] for m in _metrics(r.path)] == [0, 1]  # no epoch twice
        assert json.loads((r.path / "summary.json").read_text())["complete"]
    assert tiny_grid["res"].data_loads == 1  # seed 1 only (seed 0's runs were skipped)


def test_paired_design_same_split_head_and_order(tiny_grid):
    for seed in (0, 1):
        ft, rf = (
            tiny_grid["out"] / "digits/tiny_cnn/frac0.3" / lab / f"seed{seed}"
            for lab in ("finetune", "rifle-K1")
        )
        a, b = _metrics(ft), _metrics(rf)
        # identical before the first re-init (epoch 1); the test split is evaluated where each run's
        # reported numbers come from (--eval-test needed), so compare it where both evaluated it
        same = [k for k in a[0] if not k.startswith("test_") or None not in (a[0][k], b[0][k])]
        assert {k: a[0][k] for k in same} == {k: b[0][k] for k in same} and "val_acc" in same
        assert b[1]["reinit"] and not a[1]["reinit"] and a[1] != b[1]
        sa, sb = (json.loads((p / "summary.json").read_text()) for p in (ft, rf))
        assert sa["data_info"]["sizes"] == sb["data_info"]["sizes"]


def test_report_numbers_match_hand_aggregation(tiny_grid):
    out = tiny_grid["out"]
    res = write_report(out)
    assert res["baseline"] == "finetune"
    summ = {
        (lab, s): json.loads(
            (out / "digits/tiny_cnn/frac0.3" / lab / f"seed{s}" / "summary.json").read_text()
        )
        for lab in ("finetune", "rifle-K1")
        for s in (0, 1)
    }
    rows = {r["method"]: r for r in res["rows"]}
    for lab in ("finetune", "rifle-K1"):
        final = [summ[lab, s]["final_test_acc"] for s in (0, 1)]
        best = [summ[lab, s]["test_acc_at_best_val"] for s in (0, 1)]
        assert rows[lab]["n"] == 2
        assert rows[lab]["final_test_mean"] == pytest.approx(statistics.mean(final))
        assert rows[lab]["final_test_std"] == pytest.approx(statistics.stdev(final))
        assert rows[lab]["bestval_test_mean"] == pytest.approx(statistics.mean(best))
    d = [summ["rifle-K1", s]["final_test_acc"] - summ["finetune", s]["final_test_acc"] for s in (0, 1)]
    m, sd = statistics.mean(d), statistics.stdev(d)
    r = rows["rifle-K1"]
    assert r["diff_final_mean"] == pytest.approx(m)
    assert r["diff_final_ci_high"] - m == pytest.approx(12.706205 * sd / math.sqrt(2), rel=1e-5)
    if sd > 0:  # df = 1: p = 1 - 2/pi * atan(|t|)
        assert r["diff_final_p"] == pytest.approx(1 - 2 / math.pi * math.atan(abs(m / (sd / math.sqrt(2)))))
    md = (out / "results.md").read_text()
    assert f"{100 * statistics.mean([summ['finetune', s]['final_test_acc'] for s in (0, 1)]):.2f} ±" in md
    assert "selected on VALIDATION" in md and "rifle report" in md and '"epochs": 2' in md
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("dataset,model,train_fraction,method") and len(csv_rows) == 3
    for p in res["plots"]:
        assert p.is_file() and p.stat().st_size < 300_000


def _fake_run(root, label, seed, final, at_best, best_val, reinits=None):
    p = root / "d" / "m" / "frac0.5" / label / f"seed{seed}"
    p.mkdir(parents=True)
    method = "rifle" if reinits is not None else "finetune"
    (p / "config.yaml").write_text(
        yaml.safe_dump({"method": method, "reinits": reinits or 3, "seed": seed, "epochs": 4, "lr": 0.01})
    )
    (p / "summary.json").write_text(
        json.dumps(
            {
                "complete": True,
                "final_test_acc": final,
                "test_acc_at_best_val": at_best,
                "best_val_acc": best_val,
            }
        )
    )
    rows = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_acc": best_val, "test_acc": final} for e in range(4)
    ]
    (p / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_k_selection_compares_ks_on_their_common_seeds(tmp_path):
    for s in range(3):
        _fake_run(tmp_path, "finetune", s, 0.70, 0.70, 0.60)
        _fake_run(tmp_path, "rifle-K1", s, 0.90, 0.90, 0.61, reinits=1)
    _fake_run(tmp_path, "rifle-K3", 0, 0.80, 0.80, 0.99, reinits=3)  # one seed so far
    (tmp_path / "d/m/frac0.5/rifle-K3/seed1").mkdir()
    (tmp_path / "d/m/frac0.5/rifle-K3/seed1/error.txt").write_text("RuntimeError: boom\n")
    res = write_report(tmp_path, plots=False)
    (sel,) = [r for r in res["rows"] if r["kind"] == "selected-on-val"]
    assert res["sweeps"][0]["seeds"] == [0]  # paired: K values are compared on the same seeds
    assert (sel["selected_k"], sel["n"], sel["final_test_mean"]) == (3, 1, pytest.approx(0.80))
    assert res["failed"] == {"d/m/frac0.5/rifle-K3/seed1": "RuntimeError: boom"}
    assert "## Failed runs" in (tmp_path / "results.md").read_text()


def test_report_k_selection_uses_validation(tmp_path):
    for s in range(3):
        _fake_run(tmp_path, "finetune", s, 0.70 + 0.01 * s, 0.70, 0.60)
        _fake_run(tmp_path, "rifle-K1", s, 0.90, 0.90, 0.61, reinits=1)
        _fake_run(tmp_path, "rifle-K2", s, 0.72 + 0.02 * s, 0.71, 0.65 + 0.01 * s, reinits=2)
    res = write_report(tmp_path, plots=False)
    (sel,) = [r for r in res["rows"] if r["kind"] == "selected-on-val"]
    assert (sel["selected_k"], sel["selected_label"], sel["n"]) == (2, "rifle-K2", 3)
    assert sel["final_test_mean"] == pytest.approx(0.74)  # K=2's test accuracy, not K=1's 0.90
    assert sel["diff_final_mean"] == pytest.approx(0.74 - 0.71)
    assert res["sweeps"][0]["mean_best_val"] == {1: pytest.approx(0.61), 2: pytest.approx(0.66)}
    md = (tmp_path / "results.md").read_text()
    assert "**K=2**" in md and "K=1: 61.00, K=2: 66.00" in md


def test_two_workers_share_a_grid_and_run_each_run_once(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rifle", "bench", str(grid_file), "--out", str(out), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = re.findall(r"\] done +(\S+)", proc.stdout)  # "[w] [i/n] done RUN ..." of either worker
    runs = G.expand(G.parse_grid(TINY), out)
    assert sorted(done) == sorted(r.rel for r in runs)  # every run, exactly once
    assert "4/4 runs complete" in proc.stdout
    for r in runs:
        assert L.is_complete(r.path)
        assert (r.path / "train.log").read_text().count("epochs x") == 1  # trained by one worker only
    assert not list(out.rglob(L.LOCK)) and (out / "grid.yaml").is_file()
    assert collect(out).runs and len(collect(out).runs) == 4


def _fake_depth(run_dir, rel, before, after, epochs=(2,)):
    """A hand-made ``depth.jsonl``: 6 backbone layers + 1 head layer; ``before``/``after`` gradient norms."""
    head = [False] * 6 + [True]
    recs = [
        {
            "type": "layers",
            "names": [f"l{i}" for i in range(7)],
            "kinds": ["Conv2d"] * 6 + ["Linear"],
            "numel": [1] * 7,
            "head": head,
            "watch_epochs": list(epochs),
            "window": 2,
            "steps_per_epoch": 3,
        },
        {"type": "weights", "epoch": 0, "rel_change": [9.0] * 7},  # not the last epoch: ignored
        {"type": "weights", "epoch": 3, "rel_change": rel},
    ]
    for e in epochs:
        for off, norms in ((-2, before), (-1, before), (0, after), (1, after)):
            recs.append(
                {
                    "type": "grad",
                    "epoch": e + (off >= 0) - 1,
                    "step": 3 * e + off,
                    "reinit_epoch": e,
                    "offset": off,
                    "norms": norms,
                }
            )
    (run_dir / "depth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_report_depth_table_by_hand(tmp_path):
    from rifle.analysis.depth import backbone_thirds, read_monitor, summarize_monitor

    # thirds: 49 backbone layers -> 16 / 17 / 16, head left out
    vals = list(range(49)) + [1000.0]
    assert backbone_thirds(vals, [False] * 49 + [True]) == [7.5, 24.0, 40.5]
    ones, halves = [1.0] * 7, [0.5] * 6 + [2.0]
    for s in range(3):
        _fake_run(tmp_path, "finetune", s, 0.70, 0.70, 0.60)
        _fake_run(tmp_path, "rifle-K1", s, 0.70, 0.70, 0.60, reinits=1)
        base = tmp_path / f"d/m/frac0.5/finetune/seed{s}"
        rifle = tmp_path / f"d/m/frac0.5/rifle-K1/seed{s}"
        _fake_depth(base, [0.04, 0.06, 0.03, 0.03, 0.02, 0.02, 1.0], ones, ones)
        # first third 0.05 + 0.01 * s; gradient halves in the backbone and doubles in the head
        _fake_depth(rifle, [0.04 + 0.01 * s, 0.06 + 0.01 * s, 0.03, 0.03, 0.02, 0.02, 1.5], ones, halves)
    summ = summarize_monitor(read_monitor(tmp_path / "d/m/frac0.5/rifle-K1/seed1"))
    assert summ["rel_change"] == pytest.approx([0.06, 0.03, 0.02]) and summ["head_rel_change"] == 1.5
    assert summ["grad_ratio"] == pytest.approx([0.5, 0.5, 0.5]) and summ["head_grad_ratio"] == 2.0
    res = write_report(tmp_path, plots=False)
    base_row, rifle_row = res["depth_rows"]
    assert (base_row["method"], base_row["n"], base_row["rel_first_mean"]) == (
        "finetune",
        3,
        pytest.approx(0.05),
    )
    assert base_row["grad_first_mean"] == pytest.approx(1.0)
    assert rifle_row["rel_first_mean"] == pytest.approx(0.06)
    assert rifle_row["rel_first_std"] == pytest.approx(0.01)  # 0.05, 0.06, 0.07
    assert rifle_row["diff_rel_first_mean"] == pytest.approx(0.01)  # paired: 0.00, +0.01, +0.02
    assert rifle_row["diff_rel_first_ci_low"] == pytest.approx(0.01 - 4.302653 * 0.01 / 3**0.5, abs=1e-6)
    assert rifle_row["grad_first_mean"] == pytest.approx(0.5) and rifle_row["grad_head_mean"] == 2.0
    md = (tmp_path / "results.md").read_text()
    assert "### Backpropagation in depth" in md
    assert "| rifle-K1 | 3 | 6.00 ± 1.00 | 3.00 ± 0.00 | 2.00 ± 0.00 | 150.00 | +1.000 [" in md
    assert "0.50 / 0.50 / 0.50 | 2.00 |" in md
    assert (
        (tmp_path / "depth.csv")
        .read_text()
        .splitlines()[0]
        .startswith("dataset,model,train_fraction,method,n")
    )


def test_report_page_keeps_hand_text_and_refuses_pages_without_markers(tmp_path):
    from rifle.experiments.markdown import PAGE_BEGIN, PAGE_END

    root = tmp_path / "results" / "grid"
    for s in range(2):
        _fake_run(root, "finetune", s, 0.70 + 0.01 * s, 0.70, 0.60)
        _fake_run(root, "rifle-K1", s, 0.73, 0.71, 0.61, reinits=1)
    page = tmp_path / "results" / "grid.md"
    page.write_text(f"# My page\n\nprose before\n\n{PAGE_BEGIN}\nstale table\n{PAGE_END}\n\nprose after\n")
    write_report(root, page=page)
    text = page.read_text()
    assert text.startswith("# My page\n\nprose before\n\n" + PAGE_BEGIN) and text.endswith(
        PAGE_END + "\n\nprose after\n"
    )
    assert "stale table" not in text and "4 complete runs (seeds [0, 1])" in text
    assert "| rifle-K1 | 2 | 73.00 ± 0.00 | +2.50 [" in text  # paired diffs +3, +2 points
    assert "](grid/accuracy_d_m_frac0.5.png)" in text and "[grid/results.md](grid/results.md)" in text
    assert (root / "accuracy_d_m_frac0.5.png").is_file()
    write_report(root, page=page, plots=False)  # idempotent around the markers
    assert page.read_text().count(PAGE_BEGIN) == 1 and page.read_text().endswith("prose after\n")
    bad = tmp_path / "bad.md"
    bad.write_text("# no markers\n")
    with pytest.raises(ValueError, match=r"bad\.md: --page needs exactly one pair of markers"):
        write_report(root, page=bad, plots=False)
    assert bad.read_text() == "# no markers\n"
    new = tmp_path / "new" / "page.md"
    write_report(root, page=new, plots=False)
    assert PAGE_BEGIN in new.read_text() and "](../results/grid/results.md)" in new.read_text()


# ------------------------------------------------------------------------------------------ --engine
def test_engine_flags_are_checked(tmp_path, capsys):
    from conftest import run_cli

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(TINY))
    code, _, err = run_cli(["bench", grid_file, "--out", tmp_path / "o", "--gpus-per-run", "1"], capsys)
    assert code == 2 and "--gpus-per-run: only with --engine ray" in err
    code, _, err = run_cli(
        ["bench", grid_file, "--out", tmp_path / "o", "--engine", "ray", "--workers", "2"], capsys
    )
    assert code == 2 and "--workers 2: only with --engine local" in err
    assert not (tmp_path / "o").exists()


def test_engine_ray_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(TINY))
    code, out, err = run_cli(["bench", grid_file, "--out", tmp_path / "o", "--engine", "ray"], capsys)
    assert code == 2 and "--engine ray needs Ray" in err and "[ray]'" in err and "pip install" in err
    assert not (tmp_path / "o").exists()  # nothing written before the check


def test_local_engine_imports_no_ray(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(TINY))
    code = (
        "import sys\nfrom rifle.cli import main\n"
        f"assert main(['bench', {str(grid_file)!r}, '--out', {str(tmp_path / 'o')!r}, '--list']) == 0\n"
        "assert 'ray' not in sys.modules, 'the local engine imported ray'\n"
    )
    from conftest import SRC

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ issue 20
def test_rifle_only_settings_apply_to_rifle_rows_only(tmp_path):
    spec = {
        **TINY,
        "train": {
            **TINY["train"],
            "epochs": 4,
            "reinit_trigger": "converged",
            "reinit_init": "norm_matched",
            "keep_optimizer_state": True,
            "reinits": 2,
        },
        "methods": [{"name": "finetune"}, {"name": "rifle"}, {"name": "finetune", "reg": "l2sp"}],
    }
    runs = G.expand(G.parse_grid(spec), tmp_path)
    defaults = G.TrainConfig()
    by = {r.label: r.cfg for r in runs if r.seed == 0}
    assert set(by) == {"finetune", "rifle-K2", "finetune+l2sp"}
    rifle = by["rifle-K2"]
    assert (
        rifle.reinit_trigger,
        rifle.reinit_init,
        rifle.keep_optimizer_state,
        rifle.reinits,
        rifle.min_steps_after,
    ) == ("converged", "norm_matched", True, 2, 0)
    for label in ("finetune", "finetune+l2sp"):
        recorded = by[label].to_dict()  # what config.yaml records
        for key in G.RIFLE_ONLY_KEYS:
            assert recorded[key] == getattr(defaults, key), (label, key)
        assert (recorded["epochs"], recorded["lr"]) == (4, 0.05)  # the rest of train: still applies
    # with --record-depth a fine-tuning row keeps K: its depth monitor records RIFLE-K's epochs
    depth = G.expand(G.parse_grid({**spec, "train": {**spec["train"], "record_depth": True}}), tmp_path)
    assert [r.cfg.reinits for r in depth if r.label == "finetune"] == [2, 2]
    assert all(r.cfg.reinit_trigger == "schedule" for r in depth if r.label == "finetune")
    # a non-RIFLE entry that sets one itself would ignore it: refused, naming the key
    with pytest.raises(G.GridError, match=r"methods\[0\] \(lp-ft\): reinit_init applies to name: rifle only"):
        G.parse_grid({**TINY, "methods": [{"name": "lp-ft", "reinit_init": "norm_matched"}]})


def test_a_typo_in_a_grid_dataset_or_model_is_refused_before_any_run(tmp_path, capsys):
    from conftest import run_cli

    for key, bad, needle in (
        ("datasets", ["digits", "digts"], r"datasets\[1\]: unknown dataset 'digts'.*'digits'"),
        ("models", ["tiny_cnn", "tiny_cn"], r"models\[1\]: unknown model 'tiny_cn'.*tiny_cnn"),
    ):
        grid_file = tmp_path / f"{key}.yaml"
        grid_file.write_text(yaml.safe_dump({**TINY, key: bad}))
        out = tmp_path / key
        code, _, err = run_cli(["bench", grid_file, "--out", out], capsys)
        assert code == 2 and re.search(needle, err, re.S), err
        assert not out.exists()  # not even the first (valid) run started


def test_a_changed_grid_is_refused_naming_the_keys_or_rerun_with_rerun_changed(tmp_path, capsys):
    from conftest import run_cli

    spec = {**TINY, "methods": [{"name": "finetune"}], "seeds": [0], "train": {**TINY["train"], "epochs": 1}}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    code, _, err = run_cli(["bench", grid_file, "--out", out], capsys)
    assert code == 0, err
    (run,) = G.expand(G.parse_grid(spec), out)
    stamp, copy = (run.path / "summary.json").stat().st_mtime_ns, (out / "grid.yaml").read_text()
    spec["train"]["epochs"] = 2
    grid_file.write_text(yaml.safe_dump(spec))
    code, stdout, err = run_cli(["bench", grid_file, "--out", out], capsys)
    assert code == 2 and "1 run(s) in" in err and "changed keys: epochs (1 -> 2)" in err, err
    assert "digits/tiny_cnn/frac0.3/finetune/seed0: epochs: 1 -> 2" in err and "--rerun-changed" in err
    assert (run.path / "summary.json").stat().st_mtime_ns == stamp  # the old run untouched
    assert (out / "grid.yaml").read_text() == copy  # and the copy of the grid
    code, stdout, _ = run_cli(["bench", grid_file, "--out", out, "--list"], capsys)
    assert code == 0 and stdout.startswith("changed  digits/tiny_cnn/frac0.3/finetune/seed0")
    code, stdout, err = run_cli(["bench", grid_file, "--out", out, "--rerun-changed"], capsys)
    assert code == 0, err
    assert "the previous copy is kept as" in stdout and "done" in stdout
    assert (out / "grid.previous-1.yaml").read_text() == copy and "epochs: 2" in (
        out / "grid.yaml"
    ).read_text()
    assert [m["epoch"] for m in _metrics(run.path)] == [0, 1]  # trained again from scratch, 2 epochs
    assert (run.path / "train.log").read_text().count("epochs x") == 1
    code, stdout, err = run_cli(["bench", grid_file, "--out", out], capsys)  # now it matches: skipped
    assert code == 0 and "skipped" in stdout and not (out / "grid.previous-2.yaml").exists()


def test_seeds_runs_only_those_seeds_in_every_worker_and_refuses_unknown_ones(tmp_path, capsys):
    from conftest import run_cli

    spec = {**TINY, "methods": [{"name": "finetune"}], "train": {**TINY["train"], "epochs": 1}}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    for bad, needle in (
        ("3", r"seed\(s\) \[3\] are not in grid .*its seeds: \[0, 1\]"),
        ("a", "comma-separated"),
    ):
        code, _, err = run_cli(["bench", grid_file, "--out", out, "--seeds", bad], capsys)
        assert code == 2 and re.search(needle, err), err
    assert not out.exists()
    argv = [sys.executable, "-m", "rifle", "bench", str(grid_file), "--out", str(out)]
    proc = subprocess.run(  # the filter must reach the worker processes of --workers 2
        [*argv, "--workers", "2", "--seeds", "1"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seed0, seed1 = G.expand(G.parse_grid(spec), out)
    assert L.is_complete(seed1.path) and not seed0.path.exists()
    assert "1/1 runs complete" in proc.stdout
    code, stdout, _ = run_cli(["bench", grid_file, "--out", out, "--list"], capsys)  # no --seeds: all
    assert code == 0 and stdout.splitlines()[:2] == [f"todo     {seed0.rel}", f"done     {seed1.rel}"]


def test_report_on_one_run_and_on_only_failed_runs(tmp_path, capsys):
    from conftest import run_cli

    _fake_run(tmp_path / "one", "rifle-K1", 0, 0.9, 0.9, 0.8, reinits=1)
    code, out, _ = run_cli(["report", tmp_path / "one/d/m/frac0.5/rifle-K1/seed0", "--no-plots"], capsys)
    assert code == 0 and "None" not in out and "1 method rows (one method: nothing to compare)" in out
    failed = tmp_path / "failed/d/m/frac0.5/finetune/seed0"
    failed.mkdir(parents=True)
    (failed / "error.txt").write_text("RuntimeError: boom\n")
    (failed / "summary.json").write_text("{}")
    code, out, err = run_cli(["report", tmp_path / "failed", "--no-plots"], capsys)
    assert code == 1 and "no run in" in err and "(1 failed, 0 unfinished)" in err, out + err


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "analyze", "report"])
def test_every_command_takes_threads_and_applies_it(tmp_path, capsys, command):
    import torch
    from conftest import run_cli

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    extra = [tmp_path / "x.png"] if command == "predict" else []
    try:
        code, _, err = run_cli([command, tmp_path / "no_run", *extra, "--threads", want], capsys)
        assert torch.get_num_threads() == want, err
    finally:
        torch.set_num_threads(before)
    assert "unrecognized arguments" not in err and code != 0  # parsed; then the missing run is named
    assert "no_run" in err
    code, _, err = run_cli([command, tmp_path / "no_run", *extra, "--threads", "0"], capsys)
    assert code == 2 and "--threads 0: must be >= 1" in err
