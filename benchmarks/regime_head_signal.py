"""The regime study's addendum: the same-batch head-signal ratio (plan: benchmarks/regime/plan.md, Addendum).

    python benchmarks/regime_head_signal.py docs/results/regime_head_signal --study docs/results/regime \
        --page docs/results/regime.md

For each cell, the RIFLE-K1 runs re-run with the head-signal measurement: their head-signal ratio beside
the reference of the study ("did the re-init deepen backpropagation": RIFLE's after/before gradient
ratio over the paired fine-tuning control's, same seed, ``÷ control > 1``), the agreement of each
candidate delivered cut with that reference, the cut the pre-registered rule picks, and whether the re-runs
reproduce the study's runs. Writes ROOT/head_signal_runs.csv and the block between the page's markers.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from regime_report import run_rows
from rifle.experiments.collect import collect
from rifle.experiments.markdown import update_page

CELLS = ["digits64", "digits32", "elpv64"]
METHOD = "rifle-K1"
CANDIDATES = [1.0, 1.1, 1.2, 1.3, 1.5]
CURRENT = 1.0  # the cut in the code when the addendum was written
BEGIN, END = "<!-- head signal: begin -->", "<!-- head signal: end -->"
COLUMNS = [
    "cell",
    "seed",
    "train_loss_before",
    "train_acc_before",
    "converged",
    "grad_ratio",
    "control_ratio",
    "ratio_vs_control",
    "study_ratio_vs_control",
    "head_signal_ratio",
    "verdict",
    "final_test",
    "study_final_test",
    "reproduced",
]


def rows_for(root: Path, study: Path) -> list[dict[str, Any]]:
    out = []
    for cell in CELLS:
        new = {r["seed"]: r for r in run_rows(cell, collect(root / cell)) if r["method"] == METHOD}
        old = (
            {r["seed"]: r for r in run_rows(cell, collect(study / cell)) if r["method"] == METHOD}
            if (study / cell).is_dir()
            else {}
        )
        for seed, r in sorted(new.items()):
            o = old.get(seed, {})
            out.append(
                {
                    **{k: r.get(k) for k in COLUMNS if k in r},
                    "cell": cell,
                    "seed": seed,
                    "study_ratio_vs_control": o.get("ratio_vs_control"),
                    "study_final_test": o.get("final_test"),
                    "reproduced": bool(o)
                    and o.get("final_test") == r.get("final_test")
                    and o.get("grad_ratio") == r.get("grad_ratio"),
                }
            )
    return out


def agreement(rows: list[dict[str, Any]], cut: float) -> int:
    return sum((r["head_signal_ratio"] >= cut) == (r["ratio_vs_control"] > 1) for r in rows)


def choose(rows: list[dict[str, Any]]) -> tuple[float, dict[float, int]]:
    """The pre-registered rule: the most agreeing candidate; the current cut stays unless another
    agrees in at least 2 more runs; ties go to the smaller cut."""
    scores = {c: agreement(rows, c) for c in CANDIDATES}
    best = min(CANDIDATES, key=lambda c: (-scores[c], c))
    return (best if scores[best] >= scores[CURRENT] + 2 else CURRENT), scores


def _f(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: list[dict[str, Any]], chosen: float, scores: dict[float, int], cmd: str) -> str:
    n = len(rows)
    lines = [
        f"Written by `{cmd}` from the run folders; per-run numbers in "
        "[regime_head_signal/head_signal_runs.csv](regime_head_signal/head_signal_runs.csv). "
        f"RIFLE-K1 re-run with the head-signal measurement (same recipe and seeds as the study; "
        f"fine-tuning re-run as the control). ÷ control: this re-run's after/before ratio over its "
        f"control's (the reference: > 1 = the re-init deepened backpropagation); head signal: the new "
        f"head's error into the backbone over the old head's, same batch.",
        "",
        "| cell | seed | loss / acc before | converged | ÷ control (study) | head signal | verdict | "
        "final test (study) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['seed']} | {_f(r['train_loss_before'])} / {_f(r['train_acc_before'])} | "
            f"{'yes' if r['converged'] else 'no'} | {_f(r['ratio_vs_control'])} "
            f"({_f(r['study_ratio_vs_control'])}) | x{_f(r['head_signal_ratio'])} | {r['verdict']} | "
            f"{_f(100 * r['final_test'] if r['final_test'] is not None else None)} "
            f"({_f(100 * r['study_final_test'] if r['study_final_test'] is not None else None)}) |"
        )
    lines += [
        "",
        "Agreement of `head signal ≥ cut` with `÷ control > 1`, of "
        + str(n)
        + " runs: "
        + ", ".join(f"{c:g}: {scores[c]}" for c in CANDIDATES)
        + f". Rule (plan, Addendum): the cut becomes **{chosen:g}**"
        + (" (unchanged)." if chosen == CURRENT else "."),
        f"Re-runs identical to the study's runs (final test and gradient ratio): "
        f"{sum(bool(r['reproduced']) for r in rows)} of {n}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder with one rifle bench grid per cell")
    p.add_argument("--study", type=Path, default=Path("docs/results/regime"), help="the study's cell folders")
    p.add_argument("--page", type=Path, help="page whose block between the head-signal markers is rewritten")
    args = p.parse_args(argv)
    rows = rows_for(args.root, args.study)
    missing = [r for r in rows if r.get("head_signal_ratio") is None or r.get("ratio_vs_control") is None]
    if not rows or missing:
        print(
            f"{args.root}: {len(rows)} RIFLE-K1 runs, {len(missing)} without a head-signal ratio or a "
            f"control; run the grids first (benchmarks/regime/head_signal/)",
            file=sys.stderr,
        )
        return 2
    chosen, scores = choose(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    (args.root / "head_signal_runs.csv").write_text(buf.getvalue())
    cmd = f"python benchmarks/regime_head_signal.py {args.root} --study {args.study}" + (
        f" --page {args.page}" if args.page else ""
    )
    text = markdown(rows, chosen, scores, cmd)
    print(text)
    if args.page:
        update_page(args.page, f"{BEGIN}\n\n{text}\n{END}", BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
