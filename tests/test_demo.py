"""`rifle demo`: fine-tuning vs RIFLE in each regime cell, paired, with the verdict (a shrunk recipe)."""

import json

from rifle.demo import CELLS, DEMO, run_demo


def test_demo_runs_each_cell_paired_and_writes_the_verdicts(tmp_path, capsys):
    recipe = dict(model="tiny_cnn", epochs=4, train_fraction=0.4, batch_size=64, lr=0.05, min_steps_after=0)
    res = run_demo(
        out=str(tmp_path), recipe=recipe, cells={"16px": dict(image_size=16), "20px": dict(image_size=20)}
    )
    out = capsys.readouterr().out
    text = (tmp_path / "comparison.md").read_text()
    for cell in ("16px", "20px"):
        [d] = res[cell]["rifle"]["rifle_diagnosis"]
        assert d["at"] == 2 and f"- {cell}: {d['verdict']}" in text and d["verdict"] in out
        assert "rifle_diagnosis" not in res[cell]["finetune"]
        rows = {
            m: [json.loads(x) for x in (tmp_path / cell / m / "metrics.jsonl").read_text().splitlines()]
            for m in ("finetune", "rifle")
        }
        # paired: same split, head and data order, so identical until the re-init epoch
        assert [r["train_loss"] for r in rows["finetune"][:2]] == [r["train_loss"] for r in rows["rifle"][:2]]
        assert rows["finetune"][2]["train_loss"] != rows["rifle"][2]["train_loss"]
        delta = 100 * (res[cell]["rifle"]["final_test_acc"] - res[cell]["finetune"]["final_test_acc"])
        assert f"| {delta:+.2f} |" in text
        assert (
            d["head_signal_ratio"] is not None
            and f"| x{d['head_signal_ratio']:.2f} | x{d['grad_ratio']:.2f} |" in text
        )
    assert "judge accuracy on validation" in text and "judge accuracy on validation" in out.replace("\n", " ")
    assert (
        json.loads((tmp_path / "20px" / "rifle" / "summary.json").read_text())["preprocessing"]["image_size"]
        == 20
    )


def test_demo_recipe_is_the_studies_digits64_cells():
    import yaml
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    for cell, file in (
        ("64px-clean", "regime/digits64.yaml"),
        ("64px-noise0.4", "replication/digits64_noise40.yaml"),
    ):
        grid = yaml.safe_load((root / file).read_text())
        assert grid["datasets"] == [DEMO["data"]] and grid["models"] == [DEMO["model"]]
        assert grid["train_fractions"] == [DEMO["train_fraction"]]
        for k in ("epochs", "batch_size", "lr"):
            assert grid["train"][k] == DEMO[k], k
        assert grid["train"]["image_size"] == CELLS[cell]["image_size"]
        assert grid["train"].get("label_noise", 0.0) == CELLS[cell].get("label_noise", 0.0)
