"""`rifle` end to end on tiny data, and every bad input of the foundation issue (§5)."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import make_image_folder, run_cli as run

FAST = ["--model", "tiny_cnn", "--image-size", "16", "--batch-size", "16", "--epochs", "2", "--quiet"]


def test_train_on_unseen_image_folder_end_to_end(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    code, stdout, err = run(
        ["train", "--data", str(data), "--method", "rifle", "--reinits", "1", "--out", str(out), *FAST],
        capsys,
    )
    assert code == 0, err
    assert "final test acc" in stdout
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.safetensors", "state.pt"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and [r["reinit"] for r in rows] == [False, True]
    for key in (
        "epoch",
        "lr",
        "train_loss",
        "train_acc",
        "val_acc",
        "test_acc",
        "reinit",
        "seconds",
        "images_per_s",
    ):
        assert key in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "final_test_acc",
        "best_val_acc",
        "test_acc_at_best_val",
        "best_val_epoch",
        "reinit_epochs",
        "method",
        "seed",
        "wall_seconds",
        "versions",
    ):
        assert key in summary
    assert summary["classes"] == ["cat", "dog", "fox"] and summary["reinit_epochs"] == [1]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "rifle" and config["reinits"] == 1 and config["lr"] == 0.01


def test_config_file_and_preset_precedence(tmp_path, capsys):
    from rifle.config import resolve

    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 1e-3\nimage-size: 64\n")
    c = resolve({"epochs": 5}, config_file=f, preset="cpu")
    assert (c.epochs, c.lr, c.image_size, c.model) == (5, 0.001, 64, "efficientnet_lite0")
    p = resolve({}, preset="paper")
    assert (p.model, p.epochs, p.image_size, p.keep_optimizer_state) == (
        "torchvision:resnet50",
        40,
        224,
        True,
    )
    f.write_text("epoch: 7\n")
    code, _, err = run(["train", "--config", str(f), *FAST], capsys)
    assert code == 2 and "unknown key 'epoch'" in err and "epochs" in err


@pytest.mark.parametrize(
    "case,needle",
    [
        ("no_train", "train/"),
        ("no_test", "test/"),
        ("empty_class", "dog"),
        ("test_only_class", "wolf"),
        ("corrupt", "broken.png"),
    ],
)
def test_bad_image_folders_name_the_problem(tmp_path, capsys, case, needle):
    root = make_image_folder(tmp_path / "d")
    import shutil

    if case == "no_train":
        shutil.rmtree(root / "train")
    elif case == "no_test":
        shutil.rmtree(root / "test")
    elif case == "empty_class":
        for p in (root / "train" / "dog").iterdir():
            p.unlink()
    elif case == "test_only_class":
        (root / "test" / "wolf").mkdir()
        shutil.copy(root / "test" / "cat" / "0.png", root / "test" / "wolf" / "0.png")
    elif case == "corrupt":
        (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, _, err = run(["train", "--data", str(root), "--out", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


def test_skip_bad_images_reports_count(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d")
    (root / "train" / "cat" / "broken.png").write_bytes(b"garbage")
    (root / "train" / "dog" / "notes.jpg").write_text("not an image")
    code, _, err = run(
        ["train", "--data", str(root), "--out", str(tmp_path / "r"), "--skip-bad-images", *FAST], capsys
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert len(summary["data_info"]["skipped"]) == 2


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "efficientnet_lit0"], "efficientnet_lite0"),
        (["--data", "elvp"], "elpv"),
        (["--reinits", "-1", "--method", "rifle"], "reinits"),
        (["--method", "rifle", "--reinits", "5"], "non-empty periods"),
        (["--method", "rifle", "--reinits", "1", "--guard", "2"], "drops every"),
        (["--lr", "0"], "--lr"),
        (["--train-fraction", "1.5"], "--train-fraction"),
        (["--device", "cuda"], "CUDA is not available"),
    ],
)
def test_bad_settings_give_clear_errors(tmp_path, capsys, argv, needle):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    base = ["train", "--data", "digits", "--out", str(tmp_path / "r"), *FAST]
    code, _, err = run(base + argv, capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_existing_run_folder_and_resume_with_changed_config(tmp_path, capsys):
    args = ["train", "--data", "digits", "--out", str(tmp_path / "r"), "--train-fraction", "0.2", *FAST]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, _, err = run(args + ["--resume", "--lr", "0.5"], capsys)
    assert code == 2 and "lr: 0.01 -> 0.5" in err
    code, out, _ = run(args + ["--resume"], capsys)
    assert code == 0  # already complete: nothing to do


def test_help_shows_examples():
    from rifle.commands import COMMANDS

    assert {"train", "demo", "bench", "report", "analyze", "predict", "evaluate", "export"} <= set(COMMANDS)
    for argv in (["--help"], *([name, "--help"] for name in COMMANDS)):
        proc = subprocess.run([sys.executable, "-m", "rifle", *argv], capture_output=True, text=True)
        assert proc.returncode == 0
        assert "example" in proc.stdout and "rifle " in proc.stdout


@pytest.mark.slow
def test_elpv_efficientnet_lite0_smoke(tmp_path, capsys):
    code, out, err = run(
        [
            "train",
            "--data",
            "elpv",
            "--model",
            "efficientnet_lite0",
            "--method",
            "rifle",
            "--reinits",
            "1",
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--train-fraction",
            "0.03",
            "--batch-size",
            "16",
            "--min-steps-after",
            "0",
            "--out",
            str(tmp_path / "e"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["classes"] == ["functional", "possibly_defective", "likely_defective", "defective"]
    assert summary["head"] == ["classifier"] and summary["reinit_epochs"] == [1]
    rows = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reinit"] for r in rows] == [False, True]
    # the saved model, evaluated again on the test split, gives exactly the accuracy the run reports
    code, _, err = run(
        ["evaluate", str(tmp_path / "e"), "--split", "test", "--out", str(tmp_path / "ev")], capsys
    )
    assert code == 0, err
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["accuracy"] == summary["final_test_acc"] == rows[-1]["test_acc"]
