"""benchmarks/replication_report.py: the plan's decisions from run folders (synthetic, hand-made)."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from rifle.experiments.stats import bootstrap_paired
from test_report_stats import DELIVERED, NOT_CONVERGED, _correct, fake_run

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "replication_report", ROOT / "benchmarks/replication_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(root, cell, seeds, ft, k1, val_ft=140, val_k1=140):
    (root / cell).mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / f"benchmarks/replication/{cell}.yaml", root / cell / "grid.yaml")
    for s in seeds:
        fake_run(root, cell, "finetune", s, test_k=ft, val_k=val_ft)
        fake_run(root, cell, "rifle-K1", s, test_k=k1, val_k=val_k1, rifle=True, diagnoses=[NOT_CONVERGED])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    rep, reg = base / "replication", base / "regime"
    # R1: +5 points on test (10 of 200 images) and on validation in every seed -> replicated
    _cell(rep, "elpv64", range(5, 15), ft=140, k1=150, val_k1=150)
    # R3: +5 on test but -5 on validation -> not replicated (the plan needs validation's sign too)
    _cell(rep, "elpv64_lite2", range(5), ft=140, k1=150, val_k1=130)
    # R2: 0 at noise 0 (the regime study), +1 at 0.2, +3 at 0.4, validation up -> supported
    (reg / "digits64").mkdir(parents=True)
    for s in range(5):
        fake_run(reg, "digits64", "finetune", s, test_k=150, val_k=150)
        fake_run(reg, "digits64", "rifle-K1", s, test_k=150, val_k=150, rifle=True, diagnoses=[DELIVERED])
    _cell(rep, "digits64_noise20", range(5), ft=140, k1=142)
    _cell(rep, "digits64_noise40", range(5), ft=140, k1=146, val_k1=144)
    page = base / "replication.md"
    page.write_text("# Replication\n\n<!-- replication study: begin -->\n<!-- replication study: end -->\n")
    assert _script().main([str(rep), "--regime", str(reg), "--page", str(page)]) == 0
    return dict(rep=rep, page=page.read_text(), res=json.loads((rep / "replication.json").read_text()))


def test_decisions_follow_the_plans_rules(study):
    dec = study["res"]["decisions"]
    r1 = next(v for k, v in dec.items() if k.startswith("R1 ("))
    r3 = next(v for k, v in dec.items() if k.startswith("R3"))
    r2 = next(v for k, v in dec.items() if k.startswith("R2"))
    assert r1.startswith("replicated — cell incomplete (20/30 runs)")
    assert r3.startswith("not replicated")
    assert r2.startswith("supported — Δ_0 = +0.00 (regime study), Δ_0.2 = +1.00, Δ_0.4 = +3.00")


def test_primary_numbers_and_bootstrap_by_hand(study):
    c = study["res"]["cells"]["elpv64"]["comparisons"][0]
    assert (c["method"], c["baseline"], c["n"]) == ("rifle-K1", "finetune", 10)
    assert c["test"]["delta"] == pytest.approx(5.0)
    # the bootstrap over the per-image differences the files hold: 10 of 200 images right only for K1
    p150, y = _correct(200, 150)
    p140, _ = _correct(200, 140)
    per_image = ((p150 == y).astype(float) - (p140 == y).astype(float)).tolist()
    assert sum(per_image) == 10
    assert c["test"]["bootstrap"] == [100 * x for x in bootstrap_paired([per_image] * 10)]
    assert c["test"]["sign"] == {"positive": 10, "negative": 0, "ties": 0, "p": pytest.approx(2 / 2**10)}
    assert study["res"]["cells"]["elpv64_lite2"]["comparisons"][0]["val"]["delta"] == pytest.approx(-5.0)


def test_noise_refuted_when_the_gain_does_not_grow():
    mod = _script()
    c = {"test": {"delta": 0.1, "bootstrap": [-0.5, 0.7]}, "val": {"delta": 0.2}}
    assert mod.noise_decision(0.13, c, c) == "refuted"  # Δ_0.4 <= Δ_0 and the 1-point gain is excluded
    wide = {"test": {"delta": 2.0, "bootstrap": [-0.5, 4.0]}, "val": {"delta": 0.2}}
    assert mod.noise_decision(0.13, c, wide) == "inconclusive"
    small = {"test": {"delta": 0.5, "bootstrap": [0.1, 0.9]}, "val": {"delta": 0.2}}
    mid = {"test": {"delta": 0.3, "bootstrap": [-0.2, 0.8]}, "val": {"delta": 0.0}}
    assert mod.noise_decision(0.13, mid, small) == "supported"  # the amended rule: supported first
    assert mod.noise_decision(0.13, c, small) == "refuted"  # not monotone (Δ_0.2 < Δ_0), gain < 1 excluded


def test_page_block_and_run_table(study):
    page = study["page"]
    assert "| R1 `elpv64` | 20/30 | rifle-K1 − finetune | 10 | +5.00 | [+" in page
    assert "**Majority-class shift**" in page and "functional" in page
    rows = (study["rep"] / "replication_runs.csv").read_text().splitlines()
    assert rows[0].startswith("cell,method,seed,final_test") and len(rows) == 1 + 20 + 10 + 10 + 10
