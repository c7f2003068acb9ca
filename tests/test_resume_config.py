"""`rifle train`: --resume alone, the data fingerprint, failed first attempts, cyclic-lr cycles for
fine-tuning, the paper preset without validation, and defaults shown in --help (issue 11)."""

import json
import re

import pytest
import yaml

from conftest import killed_at_epoch, make_image_folder, metrics, run_cli as run
from rifle.cli import main

FAST = ["--model", "tiny_cnn", "--image-size", "16", "--batch-size", "16", "--quiet"]


# ------------------------------------------------------------------------------ 1. --resume alone
def test_resume_alone_continues_with_the_runs_own_config(tmp_path, capsys):
    settings = [
        "--data",
        "digits",
        "--train-fraction",
        "0.2",
        "--method",
        "rifle",
        "--reinits",
        "1",
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--seed",
        "3",
        "--trick",
        "dropout",
        "--dropout-p",
        "0.2",
        *FAST,
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    assert run(["train", "--out", str(full), *settings], capsys)[0] == 0
    killed_at_epoch(["train", "--out", str(split), *settings], 2, tmp_path)
    assert len(metrics(split)) == 2 and not (split / "summary.json").exists()

    # explicit settings that differ are refused, naming only the differing keys
    code, _, err = run(
        ["train", "--out", str(split), "--resume", "--lr", "0.5", "--dropout-p", "0.3"], capsys
    )
    assert code == 2 and "lr: 0.05 -> 0.5" in err and "options.dropout.p: 0.2 -> 0.3" in err, err
    assert "resolved_methods" not in err and "epochs" not in err and "reinits" not in err
    code, _, err = run(["train", "--out", str(split), "--resume", "--preset", "cpu"], capsys)
    assert code == 2 and "preset: None -> 'cpu'" in err

    # the README's command: --resume and nothing else continues with the run's settings
    code, out, err = run(["train", "--out", str(split), "--resume"], capsys)
    assert code == 0, err
    assert metrics(split) == metrics(full)  # no epoch twice, the same numbers as uninterrupted
    assert json.loads((split / "summary.json").read_text())["complete"]


def test_resume_accepts_the_same_flags_and_equivalent_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "d")
    settings = ["--epochs", "2", "--lr", "0.02", *FAST]
    assert run(["train", "--data", "d", "--out", "r", *settings], capsys)[0] == 0
    for data, out in (("d/", "r/"), (str(tmp_path / "d"), str(tmp_path / "r")), ("./d", "r")):
        code, out_text, err = run(["train", "--data", data, "--out", out, "--resume", *settings], capsys)
        assert code == 0, err  # complete: nothing to do, but no refusal


def test_config_file_accepts_a_runs_own_config_yaml(tmp_path, capsys):
    first = tmp_path / "first"
    args = ["--data", "digits", "--train-fraction", "0.2", "--epochs", "2", "--trick", "dropout", *FAST]
    assert run(["train", "--out", str(first), *args], capsys)[0] == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert "resolved_methods" in saved  # recorded-only keys are in the file
    code, _, err = run(
        ["train", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"], capsys
    )
    assert code == 0, err
    assert metrics(tmp_path / "again") == metrics(first)
    code, _, err = run(
        ["train", "--config", str(first / "config.yaml"), "--out", str(first), "--resume"], capsys
    )
    assert code == 0, err


def test_resume_of_an_empty_folder_needs_settings(tmp_path, capsys):
    code, _, err = run(["train", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err and str(tmp_path / "none") in err
    assert not (tmp_path / "none").exists()
    # with settings, --resume on an empty folder starts the run (one job script for every submission)
    code, _, err = run(
        [
            "train",
            "--out",
            str(tmp_path / "none"),
            "--resume",
            "--data",
            "digits",
            "--train-fraction",
            "0.2",
            "--epochs",
            "2",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    assert len(metrics(tmp_path / "none")) == 2


# ---------------------------------------------------------------------------- 2. data fingerprint
def test_resume_after_the_data_changed_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d")
    out = tmp_path / "r"
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "2", *FAST]
    assert run(args, capsys)[0] == 0
    fp = json.loads((out / "data_fingerprint.json").read_text())
    assert fp["kind"] == "folder" and len(fp["files"]) == 33  # 3 classes x (8 train + 3 test)
    assert run(args + ["--resume"], capsys)[0] == 0  # unchanged: accepted

    import shutil

    shutil.copy(data / "train" / "cat" / "0.png", data / "train" / "cat" / "new.png")  # added
    (data / "train" / "dog" / "1.png").unlink()  # removed
    (data / "test" / "fox" / "2.png").write_bytes((data / "test" / "fox" / "0.png").read_bytes() + b"x")
    code, _, err = run(args + ["--resume"], capsys)
    assert code == 2, err
    assert "1 added" in err and "1 removed" in err and "1 changed" in err, err
    assert "train/cat/new.png" in err and "--overwrite" in err


def test_builtin_data_has_a_fingerprint_and_a_different_one_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["train", "--data", "digits", "--out", str(out), "--train-fraction", "0.2", "--epochs", "2", *FAST]
    assert run(args, capsys)[0] == 0
    fp = json.loads((out / "data_fingerprint.json").read_text())
    assert fp["kind"] == "builtin" and fp["name"] == "digits" and fp["images"] == 1797 and fp["version"]
    fp["version"] = "0.0-other"
    (out / "data_fingerprint.json").write_text(json.dumps(fp))
    code, _, err = run(args + ["--resume"], capsys)
    assert code == 2 and "digits" in err and "0.0-other" in err, err


def test_fingerprint_only_stats_files(tmp_path, monkeypatch):
    """Cheap on large folders: no image is opened (stat only)."""
    import builtins

    from rifle.data import data_fingerprint

    data = make_image_folder(tmp_path / "d")
    real_open = builtins.open
    opened = []

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    fp = data_fingerprint(str(data))
    assert len(fp["files"]) == 33 and not [p for p in opened if p.endswith(".png")]


# ------------------------------------------------------------- 3. a run that failed before epoch 1
@pytest.mark.parametrize("case", ["model", "data"])
def test_failed_first_attempt_does_not_block_the_corrected_run(tmp_path, capsys, case):
    data = make_image_folder(tmp_path / "d")
    broken = data / "train" / "cat" / "broken.png"
    base = ["train", "--data", str(data), "--epochs", "2", "--out", str(tmp_path / "r"), *FAST]
    if case == "model":
        code, _, err = run(base + ["--model", "tiny_cnnn"], capsys)  # a typo in the model name
    else:
        broken.write_bytes(b"not an image")
        code, _, err = run(base, capsys)
    assert code == 2, err
    broken.unlink(missing_ok=True)
    code, _, err = run(base, capsys)
    assert code == 0, err  # no --overwrite needed: no epoch was trained
    assert len(metrics(tmp_path / "r")) == 2


# ---------------------------------------------------------------------------- 4. cyclic-lr cycles
def test_cyclic_lr_for_finetune_does_not_depend_on_reinits(tmp_path, capsys):
    common = [
        "train",
        "--data",
        "digits",
        "--train-fraction",
        "0.15",
        "--method",
        "finetune",
        "--trick",
        "cyclic-lr",
        *FAST,
    ]
    code, _, err = run([*common, "--epochs", "2", "--out", str(tmp_path / "e2")], capsys)
    assert code == 0, err  # failed before: "4 cycles do not fit in 2 epoch(s)" (from the default K=3)
    # K is RIFLE's, not fine-tuning's: --reinits with another method is refused (issue 20, defect 6)
    code, _, err = run([*common, "--epochs", "8", "--reinits", "1", "--out", str(tmp_path / "k1")], capsys)
    assert code == 2 and "--reinits applies to --method rifle only" in err
    out = tmp_path / "k"
    assert run([*common, "--epochs", "8", "--out", str(out)], capsys)[0] == 0
    # default for a method other than rifle: 2 cycles (one restart, at floor(E/2))
    c = 2**-0.5  # cos(pi/4)
    assert [r["lr"] for r in metrics(out)] == pytest.approx(
        [0.01, 0.01 * 0.5 * (1 + c), 0.005, 0.01 * 0.5 * (1 - c)] * 2
    )
    out = tmp_path / "rifle"
    code, _, err = run(
        [
            "train",
            "--data",
            "digits",
            "--train-fraction",
            "0.15",
            "--method",
            "rifle",
            "--reinits",
            "3",
            "--trick",
            "cyclic-lr",
            "--epochs",
            "8",
            "--out",
            str(out),
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    assert [r["lr"] for r in metrics(out)] == pytest.approx([0.01, 0.005] * 4)  # rifle: K+1 = 4 cycles


# ----------------------------------------------------------------------------- 5. the paper preset
def test_paper_preset_trains_on_all_of_train():
    from rifle.config import resolve

    p = resolve({}, preset="paper")
    assert p.val_fraction == 0.0 and p.keep_optimizer_state and p.model == "torchvision:resnet50"


def test_val_fraction_zero_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, err = run(
        [
            "train",
            "--data",
            "digits",
            "--train-fraction",
            "0.2",
            "--val-fraction",
            "0",
            "--epochs",
            "2",
            "--out",
            str(out),
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    assert "n/a (no validation split)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_acc"] is None and summary["test_acc_at_best_val"] is None
    assert summary["data_info"]["sizes"]["val"] == 0 and summary["complete"]
    assert all(r["val_acc"] is None for r in metrics(out))


# ------------------------------------------------------------------------------- 6. --help defaults
def test_train_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    flags = [e for e in entries if e.lstrip().startswith("--")]
    assert len(flags) > 60
    missing = [e.split()[0] for e in flags if "(default" not in " ".join(e.split())]
    assert not missing, missing
    joined = " ".join(text.split())
    assert "--epochs EPOCHS training epochs (default 40" in joined
    assert "--val-fraction" in joined and "paper: 0" in joined
