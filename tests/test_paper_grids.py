"""benchmarks/paper: the paper's grids parse and expand to the planned runs; ``${VAR}`` in grid files;
``reference:`` blocks (published numbers) validate and reach ``rifle report`` beside ours, never in our
statistics (docs/experiments.md "Reference rows", docs/reproduce.md)."""

import csv
import json
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from rifle.config import TrainConfig
from rifle.experiments import grid as G

PAPER = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"
FILES = sorted(PAPER.glob("*.yaml"))
# K of RIFLE per dataset (REFERENCE.md §2: the published runs' re-inits on CUB and Stanford Cars, the
# official script's K = 3 elsewhere)
K = {"cub200": 2, "stanford_cars": 3, "stanford_dogs": 3, "food101-30": 3, "dtd": 3, "fgvc_aircraft": 3}
K.update(indoor67=3)
DATA = {  # the grid's data spec per dataset (NAME:ROOT, ROOT under ${RIFLE_DATA})
    "cub200": "cub200:/D/CUB_200_2011",
    "stanford_cars": "stanford_cars:/D/stanford_cars",
    "stanford_dogs": "stanford_dogs:/D/stanford_dogs",
    "food101-30": "food101:/D/food-101",
    "dtd": "dtd:/D/dtd",
    "fgvc_aircraft": "fgvc_aircraft:/D/fgvc-aircraft-2013b",
    "indoor67": "indoor67:/D/indoor67",
}
HAS_PER_CLASS = "train_per_class" in {f.name for f in fields(TrainConfig)}  # the lead's --train-per-class


def _labels(k: int) -> list[str]:
    return [
        "finetune",
        "finetune+dropout",
        "finetune+dropconnect",
        "finetune+stochastic-depth",
        "finetune+disturblabel",
        f"finetune+cyclic-lr+cyclic-lr.cycles={k + 1}",
        f"rifle-K{k}",
        "finetune+l2sp",
        f"rifle-K{k}+l2sp",
        "finetune+delta",
        f"rifle-K{k}+delta",
        "finetune+bss",
        f"rifle-K{k}+bss",
    ]


def test_the_paper_folder_holds_a_grid_per_dataset_and_the_table():
    assert {p.stem for p in FILES} == {"table", *(k.replace("-", "_") for k in K)}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_paper_grid_expands_to_methods_x_seeds_with_k_per_dataset(path, monkeypatch, tmp_path):
    text = path.read_text()
    if "train_per_class" in text and not HAS_PER_CLASS:
        pytest.skip("needs --train-per-class (TrainConfig.train_per_class), added with the published readers")
    monkeypatch.setenv("RIFLE_DATA", "/D")
    grid = G.load_grid(path)
    runs = G.expand(grid, tmp_path / "out", check_data=False)  # the archives are not here
    names = [e.name for e in grid.entries()]
    assert names == (list(K) if path.stem == "table" else [path.stem.replace("food101_30", "food101-30")])
    assert grid.seeds == [0, 1, 2] and grid.models == ["torchvision:resnet50"] and grid.baseline == "finetune"
    assert len(runs) == 13 * 3 * len(names)
    for name in names:
        mine = [r for r in runs if r.dataset == name]
        assert sorted({r.label for r in mine}) == sorted(_labels(K[name]))
        assert sorted((r.label, r.seed) for r in mine) == sorted(
            (lab, s) for lab in _labels(K[name]) for s in (0, 1, 2)
        )
        for r in mine:
            c = r.cfg
            assert c.data == DATA[name]  # ${RIFLE_DATA} expanded
            assert (c.model, c.epochs, c.image_size, c.batch_size, c.lr) == (
                "torchvision:resnet50",
                40,
                224,
                32,
                0.01,
            )
            assert (c.momentum, c.weight_decay, c.lr_schedule, c.val_fraction) == (0.9, 1e-4, "cosine", 0.0)
            assert (
                r.path
                == tmp_path / "out" / name / "torchvision_resnet50" / "frac1" / r.label / f"seed{r.seed}"
            )
            assert (c.extra or {})["grid"]["dataset"] == name
            if c.method == "rifle":
                assert c.reinits == K[name] and c.keep_optimizer_state is True
            else:
                assert c.reinits == TrainConfig().reinits  # RIFLE's preset settings: RIFLE rows only
            if "cyclic-lr" in c.trick:
                assert c.options["cyclic-lr"] == {"cycles": K[name] + 1}
            if name == "food101-30":
                assert c.train_per_class == 30  # type: ignore[attr-defined]
        regs = {r.label: r.cfg.reg for r in mine if r.seed == 0}
        assert regs[f"rifle-K{K[name]}+delta"] == "delta" and regs["finetune+bss"] == "bss"
    if grid.reference is not None:  # every published number names one of our rows
        labels = {e.label for e in grid.methods}
        for row in grid.reference.rows:
            assert row.dataset in names and row.compare_with in labels


def test_published_numbers_are_entered_as_reference_rows_with_their_sources():
    """The numbers of REFERENCE.md §2, each with its source and recipe; nothing else."""
    got = {}
    for path in FILES:
        spec = yaml.safe_load(path.read_text())
        ref = spec.get("reference")
        if ref is None:
            continue
        for r in ref["rows"]:
            src = ref["sources"][r["source"]]
            assert src["citation"] and src["recipe"]["backbone"].startswith("ResNet-50")
            got.setdefault(path.stem, set()).add(
                (r["source"], r["dataset"], r["compare_with"], r["accuracy"])
            )
    expected_table = {
        ("paddle-readme", "cub200", "finetune", 74.87),
        ("paddle-readme", "cub200", "rifle-K2", 76.18),
        ("paddle-readme", "stanford_cars", "finetune", 84.92),
        ("paddle-readme", "stanford_cars", "rifle-K3", 86.10),
        ("paddletransfer", "cub200", "finetune", 80.25),
        ("paddletransfer", "cub200", "rifle-K2", 80.74),
        ("paddletransfer", "indoor67", "finetune", 77.34),
        ("paddletransfer", "indoor67", "rifle-K3", 78.08),
        ("paddletransfer", "dtd", "finetune", 62.07),
        ("paddletransfer", "dtd", "rifle-K3", 63.15),
        *(
            ("tllib", "cub200", m, a)
            for m, a in (("finetune", 81.8), ("finetune+delta", 82.3), ("finetune+bss", 82.0))
        ),
        *(
            ("tllib", "stanford_cars", m, a)
            for m, a in (("finetune", 87.8), ("finetune+delta", 88.4), ("finetune+bss", 88.0))
        ),
        *(
            ("tllib", "fgvc_aircraft", m, a)
            for m, a in (("finetune", 80.2), ("finetune+delta", 82.7), ("finetune+bss", 81.2))
        ),
    }
    assert got["table"] == expected_table
    per_file = set().union(*(v for k, v in got.items() if k != "table"))
    assert per_file == expected_table  # each per-dataset file holds its dataset's rows


# ------------------------------------------------------------------------------------ ${VAR}, entries
def _spec(**over):
    spec = {
        "datasets": [{"data": "${RIFLE_TEST_DIGITS}", "name": "dig"}],
        "models": ["tiny_cnn"],
        "methods": [{"name": "finetune"}, {"name": "rifle", "reinits": 1}],
        "seeds": [0],
        "train_fractions": [0.3],
        "train": {
            "epochs": 2,
            "image_size": 16,
            "batch_size": 32,
            "lr": 0.05,
            "min_steps_after": 0,
            "log_to": "jsonl",
        },
        "reference": {
            "sources": {
                "paper-x": {
                    "citation": "A. Author et al., A paper, 2020",
                    "url": "https://example.org/x",
                    "recipe": {"backbone": "tiny_cnn", "resolution": 16, "epochs": 1},
                }
            },
            "rows": [
                {
                    "source": "paper-x",
                    "dataset": "dig",
                    "method": "fine-tuning",
                    "compare_with": "finetune",
                    "accuracy": 41.5,
                    "pm": 0.5,
                    "runs": 3,
                },
                {
                    "source": "paper-x",
                    "dataset": "dig",
                    "method": "RIFLE",
                    "compare_with": "rifle-K1",
                    "accuracy": 99.0,
                },
                {
                    "source": "paper-x",
                    "dataset": "dig",
                    "method": "something we did not run",
                    "accuracy": 12.0,
                },
            ],
        },
    }
    spec.update(over)
    return spec


def test_environment_variables_in_grid_files_expand_and_an_unset_one_is_named(monkeypatch, tmp_path):
    monkeypatch.delenv("RIFLE_TEST_DIGITS", raising=False)
    grid = G.parse_grid(_spec(), source="g.yaml")  # parsing needs no variable (rifle report reads it)
    with pytest.raises(
        G.GridError, match=r"g\.yaml: datasets\[0\]: environment variable RIFLE_TEST_DIGITS is not set"
    ):
        G.expand(grid, tmp_path)
    monkeypatch.setenv("RIFLE_TEST_DIGITS", "digits")
    runs = G.expand(grid, tmp_path)
    assert [(r.dataset, r.cfg.data, r.label) for r in runs] == [
        ("dig", "digits", "finetune"),
        ("dig", "digits", "rifle-K1"),
    ]
    assert runs[0].path == tmp_path / "dig" / "tiny_cnn" / "frac0.3" / "finetune" / "seed0"
    bad = _spec(train={"epochs": 1, "pretrained_file": "${1BAD}"})
    with pytest.raises(G.GridError, match=r"train: pretrained_file: '\$\{1BAD\}' is not a valid environment"):
        G.expand(G.parse_grid(bad), tmp_path, check_data=False)


def test_dataset_entries_and_method_dataset_restrictions(monkeypatch, tmp_path):
    spec = _spec(
        datasets=["digits", {"data": "digits", "name": "dig5", "train_fraction_seed": None}],
    )
    with pytest.raises(G.GridError, match=r"datasets\[1\] \(dig5\): unknown key 'train_fraction_seed'"):
        G.parse_grid({**spec, "reference": None})
    spec = _spec(
        datasets=["digits", {"data": "digits", "name": "dig-e3", "epochs": 3}],
        methods=[{"name": "finetune"}, {"name": "rifle", "reinits": 1, "datasets": ["dig-e3"]}],
    )
    spec["reference"]["rows"][0]["dataset"] = "digits"
    spec["reference"]["rows"] = spec["reference"]["rows"][:1]
    runs = G.expand(G.parse_grid(spec), tmp_path)
    assert [(r.dataset, r.label, r.cfg.epochs) for r in runs] == [
        ("digits", "finetune", 2),
        ("dig-e3", "finetune", 3),
        ("dig-e3", "rifle-K1", 3),
    ]
    spec["methods"][1]["datasets"] = ["dig-e4"]
    with pytest.raises(
        G.GridError, match=r"methods\[1\] \(rifle\): datasets \['dig-e4'\] must be a non-empty subset"
    ):
        G.parse_grid(spec)
    spec = _spec(datasets=["digits", {"data": "digits", "name": "digits"}])
    with pytest.raises(G.GridError, match=r"datasets \['digits', 'digits'\] have the same name twice"):
        G.parse_grid(spec)


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            lambda r: r["rows"][1].update(accuracy=176.18),
            r"rows\[1\] \(paper-x, dig, RIFLE\): accuracy 176\.18 must be",
        ),
        (
            lambda r: r["rows"][1].update(dataset="cub"),
            r"rows\[1\] \(paper-x, cub, RIFLE\): dataset 'cub' is not a dataset of this grid",
        ),
        (
            lambda r: r["rows"][0].update(compare_with="fintune"),
            r"rows\[0\] .*compare_with 'fintune' is not a method label.*did you mean finetune",
        ),
        (lambda r: r["rows"][2].update(source="paper-y"), r"rows\[2\] .*source 'paper-y' is not in sources"),
        (
            lambda r: r["rows"][0].update(acuracy=1),
            r"rows\[0\] .*unknown key 'acuracy' \(did you mean accuracy",
        ),
        (lambda r: r["rows"][0].pop("method"), r"rows\[0\] \(paper-x, dig, None\): method: is required"),
        (lambda r: r["rows"][0].update(pm=-1), r"rows\[0\] .*pm -1 must be a number >= 0"),
        (
            lambda r: r["rows"][0].update(train_fraction=1.0),
            r"rows\[0\] .*train_fraction 1\.0 is not one of the grid's",
        ),
        (lambda r: r["sources"]["paper-x"].pop("recipe"), r"sources: paper-x: recipe: is required"),
        (lambda r: r["sources"]["paper-x"].update(citation=""), r"sources: paper-x: citation: is required"),
        (lambda r: r.update(row=[]), r"reference: expected a mapping with sources: and rows:"),
    ],
)
def test_a_bad_reference_entry_is_refused_naming_it(change, needle):
    spec = _spec()
    change(spec["reference"])
    with pytest.raises(G.GridError) as err:
        G.parse_grid(spec, source="g.yaml")
    assert str(err.value).startswith("grid g.yaml: reference") and re.search(needle, str(err.value)), (
        err.value
    )


# ------------------------------------------------------------------------------ rifle bench + report
def test_bench_and_report_show_reference_rows_beside_ours_never_in_the_statistics(
    tmp_path, capsys, monkeypatch
):
    from conftest import run_cli

    monkeypatch.setenv("RIFLE_TEST_DIGITS", "digits")
    grid_file = tmp_path / "mini.yaml"
    grid_file.write_text(yaml.safe_dump(_spec(), sort_keys=False))
    out = tmp_path / "out"
    code, _, err = run_cli(["bench", grid_file, "--out", out], capsys)
    assert code == 0, err
    assert yaml.safe_load((out / "grid.yaml").read_text())["reference"] == _spec()["reference"]
    code, _, err = run_cli(["report", out, "--no-plots", "--page", tmp_path / "page.md"], capsys)
    assert code == 0, err
    page = (tmp_path / "page.md").read_text()  # a --page block shows them too
    assert (
        "### Published numbers (reference rows, not in the statistics)" in page
        and "| dig | paper-x |" in page
    )
    ours = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(ours) == {"finetune", "rifle-K1"}  # our runs only: no published row, no paired test with one
    refs = list(csv.DictReader((out / "references.csv").open()))
    assert [(r["method"], r["compare_with"], r["published"]) for r in refs] == [
        ("fine-tuning", "finetune", "41.5"),
        ("RIFLE", "rifle-K1", "99"),
        ("something we did not run", "", "12"),
    ]
    for r in refs[:2]:
        mean = 100 * float(ours[r["compare_with"]]["final_test_mean"])
        assert float(r["ours_final_test_mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(r["ours_minus_published"]) == pytest.approx(mean - float(r["published"]), abs=1e-4)
        assert r["ours_n"] == "1" and r["dataset"] == "dig"
    assert refs[2]["ours_n"] == "0" and refs[2]["ours_minus_published"] == ""
    md = (out / "results.md").read_text()
    section = md.split("## Published numbers (reference rows, not in the statistics)")[1].split("\n## ")[0]
    f = float(refs[0]["ours_final_test_mean"])
    assert (
        f"| dig | paper-x | fine-tuning | 41.50 ± 0.50 (3 runs) | `finetune` (tiny_cnn) | {f:.2f} (n=1) | "
        f"{f - 41.5:+.2f} |" in section
    )
    assert "| dig | paper-x | something we did not run | 12.00 | (none of ours) | — | — |" in section
    assert (
        "- **paper-x**: A. Author et al., A paper, 2020. <https://example.org/x> Recipe: backbone: tiny_cnn; "
        "resolution: 16; epochs: 1." in section
    )
    before = md.split("## Published numbers")[0]
    assert "41.5" not in before and "99.00" not in before  # our tables never show them
    assert not math.isnan(float(ours["rifle-K1"]["diff_final_mean"]))  # the paired test is ours vs ours


@pytest.mark.extended
def test_every_method_of_a_paper_grid_runs_on_torchvision_resnet50_and_reports_beside_the_references(
    tmp_path, capsys
):
    """benchmarks/paper/cub200.yaml as written (13 methods, --preset paper, its reference block) on a
    miniature stand-in: digits named cub200, ResNet-50 without weights at 32 px, 3 epochs, 1 seed."""
    from conftest import run_cli

    spec = yaml.safe_load((PAPER / "cub200.yaml").read_text())
    spec.update(datasets=[{"data": "digits", "name": "cub200"}], seeds=[0], train_fractions=[0.03])
    spec["train"] = {**spec["train"], "pretrained": False, "epochs": 3, "image_size": 32, "log_to": "jsonl"}
    spec["train"]["min_steps_after"] = 0  # RIFLE rows only
    grid_file = tmp_path / "mini_cub.yaml"
    grid_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["bench", grid_file, "--out", out, "--threads", "2"], capsys)
    assert code == 0 and "13 done" in stdout and "0 failed" in stdout, stdout + err
    code, _, err = run_cli(["report", out, "--no-plots"], capsys)
    assert code == 0, err
    ours = {r["method"] for r in csv.DictReader((out / "results.csv").open())}
    assert ours == set(_labels(2))
    refs = list(csv.DictReader((out / "references.csv").open()))
    assert len(refs) == 7 and all(r["ours_n"] == "1" and r["model"] == "torchvision:resnet50" for r in refs)
    assert (
        "| cub200 (CUB-200-2011) | paddle-readme | standard fine-tuning | 74.87 (1 run) |"
        in (out / "results.md").read_text()
    )


# ------------------------------------------------------------- with the published readers (issue 22 §4)
def test_paper_grid_data_specs_are_known_to_the_published_readers(monkeypatch, tmp_path):
    """Every benchmarks/paper data spec names a published reader; check_names finds the dataset's folder
    under $RIFLE_DATA before any run, and names the missing one with the expected layout."""
    from test_published_data import mini_cub

    from rifle.data.published import READERS, parse_spec

    monkeypatch.setenv("RIFLE_DATA", str(tmp_path))
    for data in DATA.values():
        spec = parse_spec(data)
        assert spec is not None and spec.name in READERS, data
    grid = G.load_grid(PAPER / "cub200.yaml")
    with pytest.raises(G.GridError, match=r"datasets\[0\]: CUB-200-2011: .*CUB_200_2011 does not exist"):
        G.check_names(grid)
    mini_cub(tmp_path)
    G.check_names(grid)


def test_the_cub_paper_grid_runs_on_a_miniature_cub_and_reports_beside_the_published_rows(
    tmp_path, capsys, monkeypatch
):
    """benchmarks/paper/cub200.yaml on a miniature CUB_200_2011 (the layout the reader reads) with two of
    its methods, 1 seed, --preset paper's ResNet-50 without downloaded weights at 32 px, 3 epochs."""
    from conftest import run_cli
    from test_published_data import mini_cub

    mini_cub(tmp_path / "data", classes=3, per_class=4)
    monkeypatch.setenv("RIFLE_DATA", str(tmp_path / "data"))
    spec = yaml.safe_load((PAPER / "cub200.yaml").read_text())
    spec["methods"] = [
        m for m in spec["methods"] if m in ({"name": "finetune"}, {"name": "rifle", "reinits": 2})
    ]
    spec.update(seeds=[0])
    labels = ("finetune", "rifle-K2")
    spec["reference"]["rows"] = [r for r in spec["reference"]["rows"] if r.get("compare_with") in labels]
    spec["train"] = {**spec["train"], "pretrained": False, "epochs": 3, "image_size": 32, "log_to": "jsonl"}
    spec["train"]["min_steps_after"] = 0  # RIFLE rows only
    grid_file = tmp_path / "mini_cub.yaml"
    grid_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["bench", grid_file, "--out", out], capsys)
    assert code == 0 and "0 failed" in stdout, stdout + err
    code, _, err = run_cli(["report", out, "--no-plots"], capsys)
    assert code == 0, err
    ours = {r["method"] for r in csv.DictReader((out / "results.csv").open())}
    assert len(ours) == 2
    refs = list(csv.DictReader((out / "references.csv").open()))
    assert {r["source"] for r in refs} >= {"paddle-readme"} and sum(r["ours_n"] == "1" for r in refs) >= 2
    md = (out / "results.md").read_text()
    assert "## Published numbers (reference rows, not in the statistics)" in md and "74.87" in md
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary["data_info"]["source_info"]["dataset"] == "CUB-200-2011"
