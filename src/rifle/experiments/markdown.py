"""The text of ``rifle report``: ``results.md``, the per-cell sections (tables, K selection, depth table,
plot links) and the generated block of a hand-written page (``--page``). See docs/experiments.md,
"The report"."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .collect import Collected


def _pct(m: float, sd: float | None = None) -> str:
    if not math.isfinite(m):
        return "-"
    return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None and math.isfinite(sd) else "")


def _diff(row: dict[str, Any], name: str, digits: int = 2) -> str:
    m = row.get(f"diff_{name}_mean")
    if m is None or not math.isfinite(m):
        return "-"
    lo, hi, p = row[f"diff_{name}_ci_low"], row[f"diff_{name}_ci_high"], row[f"diff_{name}_p"]
    ci = f" [{100 * lo:+.{digits}f}, {100 * hi:+.{digits}f}]" if math.isfinite(lo) else ""
    pt = f", p={p:.3g}" if math.isfinite(p) else ""
    pw = row.get(f"diff_{name}_p_wilcoxon")
    pw = f", pW={pw:.3g}" if pw is not None and math.isfinite(pw) else ""
    return f"{100 * m:+.{digits}f}{ci}{pt}{pw}"


QUANTITY = {
    "final": "final test",
    "bestval": "test @ best val",
    "val_final": "final val",
    "val_best": "best val",
}


def _ci(lo: Any, hi: Any, digits: int = 2) -> str:
    if not isinstance(lo, (int, float)) or not math.isfinite(lo):
        return "n/a"
    return f"[{100 * lo:+.{digits}f}, {100 * hi:+.{digits}f}]"


def _p(p: Any) -> str:
    return f"{p:.3g}" if isinstance(p, (int, float)) and math.isfinite(p) else "-"


def paired_markdown(
    rows: list[dict[str, Any]], cell: tuple, baseline: str | None, confidence: float
) -> list[str]:
    """The "paired differences" table of one cell: per method and quantity, the t interval, the two-level
    bootstrap interval, the sign test and, on the test rows, whether validation agrees in sign."""
    rows = [
        r for r in rows if (r["dataset"], r["model"], r["train_fraction"]) == cell and "diff_final_n" in r
    ]
    if not rows:
        return []
    c = int(round(confidence * 100))
    out = [
        f"Paired differences vs {baseline}, in points (method − {baseline}, per seed): "
        f"{c}% t interval and paired t p; {c}% two-level bootstrap interval (seeds, then images within "
        "each seed, from `predictions.npz`; n/a without it); exact sign test over seeds "
        "(n+/n−/ties, p). Validation rows: the same difference on the validation split.",
        "",
        f"| method | quantity | n | Δ | {c}% t CI, p | {c}% bootstrap CI | sign test | test vs val sign |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes: dict[str, None] = {}
    for r in rows:
        for q, title in QUANTITY.items():
            m = r.get(f"diff_{q}_mean", math.nan)
            flag = ""
            if q in ("final", "bestval"):
                val = {"final": "val_final", "bestval": "val_best"}[q]
                vm = r.get(f"diff_{val}_mean", math.nan)
                flag = (
                    "**disagree**"
                    if r.get(f"sign_flag_{q}")
                    else "agree"
                    if math.isfinite(m) and math.isfinite(vm)
                    else "n/a"
                )
            if r.get(f"diff_{q}_boot_note"):
                notes[r[f"diff_{q}_boot_note"]] = None
            sign = (
                f"{r[f'diff_{q}_sign_pos']}/{r[f'diff_{q}_sign_neg']}/{r[f'diff_{q}_sign_ties']}, "
                f"p={_p(r[f'diff_{q}_p_sign'])}"
                if f"diff_{q}_sign_pos" in r and r.get(f"diff_{q}_n")
                else "-"
            )
            out.append(
                f"| {r['method']} | {title} | {r.get(f'diff_{q}_n', 0)} | "
                f"{f'{100 * m:+.2f}' if math.isfinite(m) else '-'} | "
                f"{_ci(r.get(f'diff_{q}_ci_low'), r.get(f'diff_{q}_ci_high'))}, "
                f"p={_p(r.get(f'diff_{q}_p'))} | "
                f"{_ci(r.get(f'diff_{q}_boot_low'), r.get(f'diff_{q}_boot_high'))} | {sign} | {flag} |"
            )
    if notes:
        out += ["", "Bootstrap n/a where: " + "; ".join(notes) + "."]
    return out + [""]


def _share(v: float) -> str:
    return f"{100 * v:.1f}" if math.isfinite(v) else "-"


def classes_markdown(classes: list[dict[str, Any]], cell: tuple) -> list[str]:
    """Per-class recall and predicted-class shares of one cell (final-epoch test predictions)."""
    rows = [r for r in classes if (r["dataset"], r["model"], r["train_fraction"]) == cell]
    if not rows:
        return []
    names = rows[0]["classes"]
    labels = next(r for r in rows if r["method"] is None)
    methods = [r for r in rows if r["method"] is not None]
    out = [
        "Per class, final-epoch test predictions, mean over the seeds with `predictions.npz` (n): recall "
        "(% of the class's test images predicted correctly) / share of all test images predicted as the "
        "class (%), beside the class's share of the test labels. A shift toward one class shows as a "
        "larger predicted share there and lower recall elsewhere.",
        "",
        "| class | test labels | " + " | ".join(f"{r['method']} (n={r['n']})" for r in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for c, name in enumerate(names):
        cells = [f"{_share(r['recall'][c])} / {_share(r['predicted'][c])}" for r in methods]
        out.append(f"| {name} | {_share(labels['predicted'][c])} | " + " | ".join(cells) + " |")
    return out + [""]


def _ratio(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "-"


def depth_markdown(
    rows: list[dict[str, Any]], cell: tuple, baseline: str | None, confidence: float, level: int = 3
) -> list[str]:
    """The "backpropagation in depth" table of one cell (empty when no run recorded depth)."""
    rows = [r for r in rows if (r["dataset"], r["model"], r["train_fraction"]) == cell]
    if not rows:
        return []
    c = int(round(confidence * 100))
    out = [
        f"{'#' * level} Backpropagation in depth",
        "",
        "Relative weight change ‖W(T) − W(0)‖ / ‖W(0)‖ from the pretrained weights after the last epoch, "
        "mean over the conv/linear weights of the first / middle / last third of the backbone, in % "
        "(mean ± std over seeds); Δ first third: paired over seeds vs "
        f"{baseline} [{c}% CI], p. Gradient ratio: per layer, mean gradient norm in the recorded steps "
        "just after / just before each re-init epoch boundary (for runs without re-init: the same "
        "epoch boundary, the control), averaged over the layers of each third and over seeds; > 1 "
        "means a larger error signal reaches those layers after the re-init.",
        "",
        "| method | n | first third | middle third | last third | head | Δ first third [CI], p | "
        "epochs watched | grad ratio first / middle / last third | head grad ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grad = (
            " / ".join(_ratio(r[f"grad_{k}_mean"]) for k in ("first", "middle", "last"))
            if r["grad_n"]
            else "-"
        )
        out.append(
            f"| {r['method']} | {r['n']} | {_pct(r['rel_first_mean'], r['rel_first_std'])} | "
            f"{_pct(r['rel_middle_mean'], r['rel_middle_std'])} | "
            f"{_pct(r['rel_last_mean'], r['rel_last_std'])} | "
            f"{_pct(r['head_rel_mean'])} | {_diff(r, 'rel_first', digits=3)} | {r['watch_epochs'] or '-'} | "
            f"{grad} | {_ratio(r['grad_head_mean']) if r['grad_n'] else '-'} |"
        )
    return out + [""]


def _recipe(col: Collected, info: dict[str, Any], baseline: str | None) -> list[str]:
    lines = []
    if info.get("train") is not None:
        lines.append(f"- grid `train:` keys: `{json.dumps(info['train'], sort_keys=True)}`")
    ref = next((r for r in col.runs if r.label == baseline), col.runs[0] if col.runs else None)
    if ref is not None:
        c = ref.config
        keys = (
            "model",
            "pretrained",
            "epochs",
            "batch_size",
            "lr",
            "momentum",
            "weight_decay",
            "lr_schedule",
            "image_size",
            "val_fraction",
            "channels_last",
            "amp",
            "grad_accum",
        )
        lines.append(
            "- resolved recipe (" + ref.label + "): " + ", ".join(f"{k}={c[k]}" for k in keys if k in c)
        )
        pre = ref.summary.get("preprocessing") or {}
        if pre:
            lines.append(
                f"- preprocessing: resize {pre.get('resize')} -> crop {pre.get('image_size')} "
                f"(train: random crop + flip; eval: centre crop), mean {pre.get('mean')}, "
                f"std {pre.get('std')}"
            )
        versions = ref.summary.get("versions") or {}
        lines.append(
            f"- software: {', '.join(f'{k} {v}' for k, v in versions.items())}; git {ref.summary.get('git')}"
        )
    seeds = sorted({r.seed for r in col.runs})
    lines.append(f"- seeds: {info.get('seeds', seeds)} (complete runs exist for seeds {seeds})")
    return lines


def _split_lines(col: Collected) -> list[str]:
    seen, lines = set(), []
    for r in col.runs:
        di = r.summary.get("data_info") or {}
        key = (r.dataset, r.fraction, r.seed)
        if key in seen or not di:
            continue
        seen.add(key)
        if r.seed == min(x.seed for x in col.runs if (x.dataset, x.fraction) == (r.dataset, r.fraction)):
            s = di.get("sizes", {})
            lines.append(
                f"- {r.dataset}, train fraction {r.fraction:g}, seed {r.seed}: {s.get('train')} train / "
                f"{s.get('val')} val / {s.get('test')} test images; validation {di.get('val')}; "
                f"train fraction {di.get('train_fraction')} (stratified, seeded); the test split "
                "does not depend on the seed"
            )
    return lines


def cell_sections(
    rows: list[dict[str, Any]],
    sweeps: list[dict[str, Any]],
    baseline: str | None,
    plots: dict[tuple, list[str]],
    confidence: float,
    depth: list[dict[str, Any]] | None = None,
    level: int = 2,
    link_prefix: str = "",
    classes: list[dict[str, Any]] | None = None,
) -> list[str]:
    """One section per cell: the accuracy table, the K selection, the depth table and the plots
    (linked as ``link_prefix + name``; ``level``: the heading level of the cell title)."""
    c = int(round(confidence * 100))
    out: list[str] = []
    cells = sorted({(r["dataset"], r["model"], r["train_fraction"]) for r in rows})
    for cell in cells:
        out += [
            f"{'#' * level} {cell[0]} / {cell[1]} / train fraction {cell[2]:g}",
            "",
            f"| method | n | final test | Δ final vs {baseline} [{c}% CI], p | test @ best val | "
            f"Δ @ best val [{c}% CI], p | best val |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if (r["dataset"], r["model"], r["train_fraction"]) != cell:
                continue
            name = (
                f"**{r['method']}** (K={r['selected_k']} on val)"
                if r["kind"] == "selected-on-val"
                else r["method"]
            )
            out.append(
                f"| {name} | {r['n']} | {_pct(r['final_test_mean'], r['final_test_std'])} | "
                f"{_diff(r, 'final')} | {_pct(r['bestval_test_mean'], r['bestval_test_std'])} | "
                f"{_diff(r, 'bestval')} | {_pct(r['best_val_mean'], r['best_val_std'])} |"
            )
        for s in sweeps:
            if (s["dataset"], s["model"], s["train_fraction"]) == cell:
                vals = ", ".join(f"K={k}: {100 * v:.2f}" for k, v in s["mean_best_val"].items())
                out += [
                    "",
                    f"K selection for `{s['name']}` (mean best val acc over seeds {s['seeds']}): "
                    f"{vals} -> **K={s['selected_k']}**.",
                ]
        out.append("")
        out += paired_markdown(rows, cell, baseline, confidence)
        out += classes_markdown(classes or [], cell)
        out += depth_markdown(depth or [], cell, baseline, confidence, level + 1)
        for png in plots.get(cell, []):
            out += [f"![{png}]({link_prefix}{png})", ""]
    return out


def _pts(v: Any) -> str:
    return f"{100 * v:+.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def _quantity_line(row: dict[str, Any], q: str) -> str:
    """``Δ +1.07 [bootstrap -0.20, +2.10]; t [..], p=..; sign 5/0/0, p=0.0625`` of quantity ``q``."""
    if not row.get(f"diff_{q}_n"):
        return "n/a"
    boot = _ci(row.get(f"diff_{q}_boot_low"), row.get(f"diff_{q}_boot_high"))
    return (
        f"Δ {_pts(row.get(f'diff_{q}_mean'))} (bootstrap {boot}; t "
        f"{_ci(row.get(f'diff_{q}_ci_low'), row.get(f'diff_{q}_ci_high'))}, p={_p(row.get(f'diff_{q}_p'))}; "
        f"sign test {row[f'diff_{q}_sign_pos']}/{row[f'diff_{q}_sign_neg']}/{row[f'diff_{q}_sign_ties']}, "
        f"p={_p(row.get(f'diff_{q}_p_sign'))})"
    )


def decision_markdown(
    decisions: list[dict[str, Any]], rows: list[dict[str, Any]], baseline: str | None, level: int = 2
) -> list[str]:
    """The decision section: per comparison against the baseline, what validation and test say, the
    smallest difference the seeds could detect, the runs' verdicts, the warnings and the plain words."""
    if not decisions:
        return []
    out = [
        f"{'#' * level} Decision: does a method beat {baseline}?",
        "",
        "Select on validation, never on test: the **final-epoch validation accuracy** is the number to "
        "choose on (best validation, the maximum over epochs, is shown too but is itself selected and "
        "biased upward); test is reported to check it. Differences in points, paired over seeds; an "
        "interval excludes 0 here only where both the two-level bootstrap's (where there are predictions) "
        "and the t interval do (with few seeds the bootstrap is the narrower). *Detectable*: the smallest "
        "true difference a two-sided paired t-test at α = 0.05 detects with power 0.8 over this many "
        "seeds, given the observed SD of the paired differences (exact noncentral t).",
        "",
    ]
    by_key = {(r["dataset"], r["model"], r["train_fraction"], r["method"]): r for r in rows}
    for d in decisions:
        r = by_key[(d["dataset"], d["model"], d["train_fraction"], d["method"])]
        name = d["method"] + (
            f" (K={d['selected_k']} selected on val)" if d["selected_k"] is not None else ""
        )
        out += [
            f"{'#' * (level + 1)} {d['dataset']} / {d['model']} / train fraction {d['train_fraction']:g}: "
            f"{name} vs {baseline} ({d['n']} paired seeds)",
            "",
            f"- **In plain words**: {d['conclusion']}",
            f"- validation, final epoch: {_quantity_line(r, 'val_final')}; best validation: "
            f"{_quantity_line(r, 'val_best')}",
            f"- test, final epoch: {_quantity_line(r, 'final')}; test @ best val: "
            f"{_quantity_line(r, 'bestval')}",
        ]
        det = []
        vq = d.get("val_quantity", "val_final")
        for q, key, where in ((vq, "val", QUANTITY[vq]), ("final", "final", "final test")):
            mde, sd = d.get(f"mde_{key}", math.nan), r.get(f"diff_{q}_std", math.nan)
            if sd == 0:
                det.append(f"{where}: no spread between seeds (the t-test is degenerate)")
            elif isinstance(mde, float) and math.isfinite(mde):
                need = d.get(f"seeds_1pt_{key}")
                det.append(
                    f"{100 * mde:.2f} points on {where} (SD of the paired differences {100 * sd:.2f} points"
                    + (f"; a 1-point difference needs about {need} seeds" if need else "")
                    + ")"
                )
        out.append(
            f"- detectable with {d['n']} seeds: "
            + ("; ".join(det) if det else "n/a (fewer than 2 paired seeds)")
        )
        if d["is_rifle"]:
            v = "; ".join(f"{k} × {kind}" for kind, k in d["verdicts"].items()) or "none recorded"
            nv = d["runs_without_verdict"]
            fired = "".join(
                f"; {k} run(s) fired no re-init: {why}" for why, k in d.get("unfired", {}).items()
            )
            out.append(
                f"- the runs' verdicts ({sum(d['verdicts'].values())} re-inits measured): {v}"
                + (f"; {nv} run(s) without a verdict" if nv else "")
                + fired
            )
        mj = d.get("majority")
        if mj:
            shift = 100 * (mj["method"] - mj["baseline"])
            out.append(
                f"- majority class `{mj['class']}` ({100 * mj['labels']:.1f}% of the test labels): predicted "
                f"for {100 * mj['method']:.1f}% of the test images by {d['method']}, "
                f"{100 * mj['baseline']:.1f}% by {baseline} (Δ {shift:+.1f} points; per-class table above)"
            )
        if d["warnings"]:
            out.append("- **warnings** (each weakens this comparison):")
            out += [f"  - {w}" for w in d["warnings"]]
        else:
            out.append("- warnings: none")
        if d["bootstrap_notes"]:
            out.append("- bootstrap n/a: " + "; ".join(d["bootstrap_notes"]) + " (the t interval decides)")
        out.append("")
    return out


def has_events(root: Path) -> bool:
    """True when a run below ``root`` wrote TensorBoard events (``rifle train --log-to tensorboard``)."""
    return any(p.is_dir() for p in Path(root).rglob("tb"))


def tensorboard_command(root: Path) -> str:
    import shlex

    return f"tensorboard --logdir {shlex.quote(str(root))}"


def render_markdown(
    root: Path,
    col: Collected,
    rows: list[dict[str, Any]],
    sweeps: list[dict[str, Any]],
    baseline: str | None,
    info: dict[str, Any],
    plots: dict[tuple, list[str]],
    confidence: float,
    depth: list[dict[str, Any]] | None = None,
    classes: list[dict[str, Any]] | None = None,
    decisions: list[dict[str, Any]] | None = None,
    references: list[dict[str, Any]] | None = None,
) -> str:
    c = int(round(confidence * 100))
    out = [
        f"# Results: `{root}`",
        "",
        f"Regenerate: `rifle report {root}`"
        + (f" (the runs: `rifle bench {info['source']} --out {root}`)" if info.get("source") else ""),
        *(
            ["", f"Curves of every run in TensorBoard: `{tensorboard_command(root)}`"]
            if has_events(root)
            else []
        ),
        "",
        f"{len(col.runs)} complete runs"
        + (f", {len(col.unfinished)} unfinished" if col.unfinished else "")
        + (f", {len(col.failed)} failed" if col.failed else "")
        + ".",
        "",
        "## Recipe",
        "",
    ]
    out += _recipe(col, info, baseline)
    out += ["", "## Split", ""] + (_split_lines(col) or ["- (no data_info in the summaries)"])
    out += [
        "",
        "## Protocol and selection rule",
        "",
        "- **final test**: test accuracy after the last epoch (the paper's protocol).",
        "- **test @ best val**: test accuracy at the epoch with the highest validation accuracy "
        "(ties: the later epoch); the epoch is selected on validation only.",
        "- accuracies in %, mean ± sample std (ddof=1) over seeds; n = number of seeds.",
        f"- **Δ vs {baseline}**: paired over seeds (same split, same initial head, same data order "
        f"per seed): mean of per-seed differences in points, [{c}% Student-t interval], two-sided paired "
        "t-test p; pW = Wilcoxon signed-rank p when n ≥ 6.",
        f"- **bootstrap**: two-level {c}% interval of the same mean difference from the runs' "
        "`predictions.npz`: 10,000 resamples (generator `np.random.default_rng(0)`, reproducible), each "
        "drawing the seeds with replacement, then within each drawn seed its images with replacement "
        "(the same images for both methods); it covers test-set sampling as well as seed spread. "
        "**sign test**: exact two-sided binomial test over seeds (ties dropped). The same differences on "
        "validation are shown, and a test row is flagged where validation disagrees in sign.",
        "- **K of RIFLE**: when several RIFLE entries differ only in K, K is selected on VALIDATION: "
        "the highest mean best-validation accuracy over the seeds every K completed (ties: the "
        "smaller K); the row `…K*…` reports that K's test accuracy. Nothing is selected on test.",
        "",
    ]
    out += cell_sections(rows, sweeps, baseline, plots, confidence, depth, classes=classes)
    out += reference_markdown(references or [], info.get("reference"), confidence)
    if col.failed:
        out += ["## Failed runs", ""] + [f"- `{k}`: {v}" for k, v in sorted(col.failed.items())] + [""]
    if col.unfinished:
        out += ["## Unfinished runs (not counted)", ""] + [f"- `{k}`" for k in sorted(col.unfinished)] + [""]
    out += decision_markdown(decisions or [], rows, baseline)
    return "\n".join(out)


PAGE_BEGIN = "<!-- BEGIN rifle report: generated, do not edit by hand -->"
PAGE_END = "<!-- END rifle report -->"


def page_block(
    root: Path,
    page: Path,
    col: Collected,
    rows: list[dict[str, Any]],
    sweeps: list[dict[str, Any]],
    baseline: str | None,
    plots: dict[tuple, list[str]],
    confidence: float,
    depth: list[dict[str, Any]] | None,
    classes: list[dict[str, Any]] | None = None,
    decisions: list[dict[str, Any]] | None = None,
    references: list[dict[str, Any]] | None = None,
    reference: Any = None,
) -> str:
    """The generated part of a hand-written page: counts, then :func:`cell_sections` (links relative to
    it)."""
    import os

    rel = Path(os.path.relpath(root.resolve(), page.resolve().parent)).as_posix()
    seeds = sorted({r.seed for r in col.runs})
    lines = [
        PAGE_BEGIN,
        "",
        f"{len(col.runs)} complete runs (seeds {seeds})"
        + (f", {len(col.unfinished)} unfinished" if col.unfinished else "")
        + (f", {len(col.failed)} failed" if col.failed else "")
        + f". Written by `rifle report {root} --page {page}`; the protocol, the recipe, the split and "
        f"every run are in [{rel}/results.md]({rel}/results.md), the numbers in "
        f"[{rel}/results.csv]({rel}/results.csv). Accuracies in %, mean ± std over seeds; Δ = paired "
        f"difference in points vs {baseline} with its {int(round(confidence * 100))}% t interval and "
        "p; K of RIFLE selected on validation, never on test.",
        "",
    ]
    lines += cell_sections(
        rows, sweeps, baseline, plots, confidence, depth, level=3, link_prefix=f"{rel}/", classes=classes
    )
    lines += reference_markdown(references or [], reference, confidence, level=3)
    lines += decision_markdown(decisions or [], rows, baseline, level=3)
    return "\n".join(lines + [PAGE_END])


def update_page(page: str | Path, block: str, begin: str = PAGE_BEGIN, end: str = PAGE_END) -> None:
    """Replace the text between ``begin`` and ``end`` (default :data:`PAGE_BEGIN` / :data:`PAGE_END`) in
    ``page`` (created if absent; ``block`` includes the markers).

    The hand-written text around the markers is kept; a page without the markers is an error (nothing
    is overwritten).
    """
    from ..train.checkpoint import atomic_write_text

    page = Path(page)
    if not page.exists():
        page.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(page, f"# Results\n\n{block}\n")
        return
    text = page.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(end) < text.index(begin):
        raise ValueError(
            f"{page}: --page needs exactly one pair of markers to write between, in this order:\n"
            f"  {begin}\n  {end}\n(the page is left unchanged)"
        )
    atomic_write_text(page, text[: text.index(begin)] + block + text[text.index(end) + len(end) :])


def reference_markdown(
    refs: list[dict[str, Any]], reference: Any, confidence: float, level: int = 2
) -> list[str]:
    """ "Published numbers": the grid's reference rows beside our mean final test accuracy, then every
    source's citation and recipe. Kept apart from our tables: no paired difference, interval or test."""
    if not refs or reference is None:
        return []
    c = int(round(confidence * 100))
    out = [
        f"{'#' * level} Published numbers (reference rows, not in the statistics)",
        "",
        "Numbers published by others, from their code and their recipes (listed below the table), shown "
        "beside ours for orientation. They are not runs of this grid: no paired difference, interval, "
        "bootstrap or test involves them, and `results.csv` does not hold them (`references.csv` does). "
        "Recipes and selection rules differ between sources (e.g. an epoch or K chosen on the test set, "
        "single runs), by more than the gains compared. **ours − published**: our mean final test "
        "accuracy minus the published number, in points.",
        "",
        f"| dataset | source | method (as published) | published | ours | ours: final test, mean ± std (n) "
        f"[{c}% t interval] | "
        "ours − published |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in refs:
        pub = f"{r['published']:.2f}" + (
            f" ± {r['published_pm']:.2f}" if r.get("published_pm") is not None else ""
        )
        if r.get("published_runs"):
            pub += f" ({r['published_runs']} run{'s' if r['published_runs'] > 1 else ''})"
        ds = r["dataset"] + (f" ({r['as_published']})" if r.get("as_published") else "")
        method = r["method"] + (f" — {r['note']}" if r.get("note") else "")
        if r.get("ours_n"):
            lo, hi = r["ours_final_test_ci_low"], r["ours_final_test_ci_high"]
            ci = f" [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else ""
            sd = r["ours_final_test_std"]
            ours = f"{r['ours_final_test_mean']:.2f}" + (f" ± {sd:.2f}" if math.isfinite(sd) else "")
            ours += f" (n={r['ours_n']}){ci}"
            diff = f"{r['ours_minus_published']:+.2f}"
            mine = f"`{r['compare_with']}`" + (f" ({r['model']})" if r.get("model") else "")
        else:
            ours, diff = "no complete runs yet" if r.get("compare_with") else "—", "—"
            mine = f"`{r['compare_with']}`" if r.get("compare_with") else "(none of ours)"
        out.append(f"| {ds} | {r['source']} | {method} | {pub} | {mine} | {ours} | {diff} |")
    out += ["", "Sources and their recipes:", ""]
    for sid, src in reference.sources.items():
        recipe = "; ".join(f"{k}: {v}" for k, v in src.recipe.items())
        url = f" <{src.url}>" if src.url else ""
        out.append(f"- **{sid}**: {src.citation}.{url} Recipe: {recipe}.")
    out.append("")
    return out
