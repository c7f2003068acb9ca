"""rifle.load / predict / evaluate: the run's eval transform reproduced exactly, CLI behaviour and errors."""

import csv
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, run_cli as cli
from rifle.evaluation import classification_metrics, evaluate
from rifle.inference import FineTunedModel, NotARunError, RunError, find_images, load

FAST = {"model": "tiny_cnn", "image_size": 16, "batch_size": 16, "epochs": 2, "min_steps_after": 0}


def _train(data, out, **kw):
    from rifle.config import resolve
    from rifle.run import run_train

    return run_train(
        resolve({**FAST, "data": str(data), "out": str(out), **kw}), log=lambda s: None, progress=False
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    summary = _train("digits", out, train_fraction=0.3)
    return out, summary


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder")
    data = make_image_folder(base / "data")
    out = base / "run"
    _train(data, out)
    return out, data


# ------------------------------------------------------------------------------------------ load
def test_load_gives_eval_model_with_run_metadata(digits_run):
    run, summary = digits_run
    fm = load(run)
    assert isinstance(fm, FineTunedModel) and not fm.model.training
    assert fm.classes == [str(i) for i in range(10)] and fm.epoch == 1
    assert fm.preprocessing["mean"] == [0.5, 0.5, 0.5] and fm.image_size == 16 and fm.resolution == 18
    from safetensors.torch import load_file

    saved = load_file(str(run / "checkpoint.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in fm.model.state_dict().items())


def test_predict_on_cached_tensors_equals_trainer_eval(digits_run):
    """The test split's uint8 cache through fm.predict_proba == the trainer's eval (accuracy and logits)."""
    run, summary = digits_run
    fm = load(run)
    from rifle.data import build_data, eval_batches

    test = build_data("digits", 16).test
    proba = fm.predict_proba(test.images, batch_size=256)
    acc = float((proba.argmax(1) == test.labels).double().mean())
    assert acc == summary["final_test_acc"]
    # the trainer's pipeline by hand: eval_batches -> model (channels_last), softmax
    with torch.inference_mode():
        ref = torch.cat([fm.model(x) for x, _ in eval_batches(test, 256, 16, (0.5,) * 3, (0.5,) * 3)])
    torch.testing.assert_close(proba, ref.softmax(1), rtol=0, atol=1e-6)


def test_preprocess_by_hand_and_inputs_agree(folder_run):
    """A 20x14 PNG: shorter side -> 18 (PIL bilinear), centre 18x18, centre 16x16, (x/255-0.5)/0.5.

    Paths, PIL images, numpy arrays, uint8 and [0,1] float tensors of the same pixels give identical input.
    """
    run, data = folder_run
    fm = load(run)
    path = data / "test" / "dog" / "0.png"
    img = Image.open(path).convert("RGB")
    assert img.size == (20, 14)
    r = np.asarray(img.resize((25, 18), Image.BILINEAR), dtype=np.float32)  # int(18*20/14) = 25
    r = r[0:18, 4:22][1:17, 1:17]  # left = round((25-18)/2) = 4 (half to even), then offset 1
    want = torch.from_numpy(((r / 255 - 0.5) / 0.5).transpose(2, 0, 1).copy())
    got = fm.preprocess(path)
    assert got.shape == (1, 3, 16, 16)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)
    arr = np.array(img)
    u8 = torch.from_numpy(arr).permute(2, 0, 1)
    variants = [img, arr, u8, u8.float() / 255, u8.unsqueeze(0)]
    for v in variants:
        assert torch.equal(fm.preprocess(v), got), type(v)
    # grayscale: one channel replicated
    gray = img.convert("L")
    g = fm.preprocess(gray)
    assert torch.equal(g[0, 0], g[0, 1]) and torch.equal(g[0, 0], g[0, 2])
    # predict on paths == predict on PIL images; mixed lists keep order
    files = sorted((data / "test").rglob("*.png"))
    by_path = fm.predict_proba(files)
    by_pil = fm.predict_proba([Image.open(f) for f in files])
    assert torch.equal(by_path, by_pil) and by_path.shape == (9, 3)
    torch.testing.assert_close(by_path.sum(1), torch.ones(9))


def test_predict_top_k_and_input_errors(folder_run):
    run, data = folder_run
    fm = load(run)
    files = sorted((data / "test").rglob("*.png"))[:4]
    proba = fm.predict_proba(files)
    top = fm.predict(files, top_k=2)
    assert len(top) == 4 and all(len(t) == 2 for t in top)
    for p, t in zip(proba, top):
        order = p.argsort(descending=True).tolist()
        assert [c for c, _ in t] == [fm.classes[i] for i in order[:2]]
        assert t[0][1] == pytest.approx(float(p.max())) and t[0][1] >= t[1][1]
    assert len(fm.predict(files[0], top_k=99)[0]) == 3  # capped at the number of classes
    with pytest.raises(ValueError, match="top_k"):
        fm.predict(files, top_k=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fm.predict(torch.full((3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        fm.predict(torch.zeros(5, 8, 8, dtype=torch.uint8))


def test_load_errors_name_the_problem(folder_run, tmp_path):
    run, _ = folder_run
    with pytest.raises(NotARunError, match="does not exist"):
        load(tmp_path / "nope")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(run / "config.yaml", half / "config.yaml")
    with pytest.raises(NotARunError, match="missing checkpoint.safetensors"):
        load(half)
    # a checkpoint whose head does not fit the classes it claims
    from rifle.models import create_model
    from safetensors.torch import save_file

    m = create_model("tiny_cnn", 5, pretrained=False)
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items()},
        str(half / "checkpoint.safetensors"),
        metadata={"epoch": "0", "model": json.dumps("tiny_cnn"), "classes": json.dumps(["a", "b", "c"])},
    )
    with pytest.raises(RunError, match="does not fit"):
        load(half)
    # an interrupted run (no summary.json yet) still loads: classes from the checkpoint, preprocessing
    # from the model and config
    for f in ("config.yaml", "checkpoint.safetensors"):
        shutil.copy(run / f, half / f)
    fm, ref = load(half), load(run)
    assert fm.classes == ref.classes and fm.preprocessing["mean"] == ref.preprocessing["mean"]
    assert (fm.image_size, fm.resolution) == (ref.image_size, ref.resolution)
    (half / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunError, match="cannot read"):
        load(half)


# --------------------------------------------------------------------------------------- predict CLI
def test_predict_cli_folder_with_corrupt_file(folder_run, tmp_path, capsys):
    run, data = folder_run
    imgs = tmp_path / "imgs"
    (imgs / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(data / "test" / "cat" / "0.png", imgs / "a.png")
    shutil.copy(data / "test" / "fox" / "1.png", imgs / "nested" / "deeper" / "b.PNG")
    (imgs / "nested" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (imgs / "notes.txt").write_text("not an image")
    (imgs / ".hidden.png").write_bytes(b"ignored")
    code, out, err = cli(["predict", run, imgs, "--format", "csv", "--top-k", "2"], capsys)
    assert code == 1  # some input unreadable, the others still predicted
    assert "broken.jpg" in err and "Traceback" not in err and "classified 2 image(s)" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["path"], r["rank"]) for r in rows] == [
        (str(imgs / "a.png"), "1"),
        (str(imgs / "a.png"), "2"),
        (str(imgs / "nested/deeper/b.PNG"), "1"),
        (str(imgs / "nested/deeper/b.PNG"), "2"),
    ]
    fm = load(run)
    want = fm.predict([imgs / "a.png", imgs / "nested/deeper/b.PNG"], top_k=2)
    assert [(r["class"], float(r["probability"])) for r in rows] == [
        (c, pytest.approx(p, abs=1e-6)) for preds in want for c, p in preds
    ]
    code, out, err = cli(["predict", run, imgs / "a.png", "--format", "json"], capsys)
    assert code == 0 and err == ""
    got = json.loads(out)
    assert got[0]["path"] == str(imgs / "a.png") and got[0]["predictions"][0]["class"] == want[0][0][0]
    code, out, _ = cli(["predict", run, imgs / "a.png"], capsys)
    assert code == 0 and want[0][0][0] in out.splitlines()[1]
    code, _, err = cli(["predict", run, imgs / "nested" / "broken.jpg"], capsys)
    assert code == 2 and "no image could be classified" in err
    code, _, err = cli(["predict", tmp_path, imgs], capsys)
    assert code == 2 and "not a run folder" in err and "config.yaml" in err


def test_find_images_walks_recursively(tmp_path):
    (tmp_path / "d" / ".git").mkdir(parents=True)
    for name in ("d/x.JPG", "d/.git/y.png", "d/z.bin"):
        (tmp_path / name).write_bytes(b"")
    paths, problems = find_images([tmp_path / "d", tmp_path / "missing", tmp_path / "d/z.bin"])
    assert paths == [tmp_path / "d/x.JPG", tmp_path / "d/z.bin"]
    assert problems == [(str(tmp_path / "missing"), "no such file or folder")]


# -------------------------------------------------------------------------------------- evaluate
def test_classification_metrics_by_hand():
    m = classification_metrics(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0]), list("abcd"))
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == 0.6 and m["n"] == 5
    a, b, c, d = (m["per_class"][k] for k in "abcd")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == (0.5, 0.5, 0.5, 2)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0 and b["f1"] == pytest.approx(0.8)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
    assert (d["recall"], d["f1"], d["support"]) == (None, None, 0)
    assert m["macro"]["f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert m["macro"]["precision"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)


def test_evaluate_cli_reproduces_training_accuracy(digits_run, tmp_path, capsys):
    run, summary = digits_run
    out = tmp_path / "ev"
    code, stdout, err = cli(["evaluate", run, "--data", "digits", "--split", "test", "--out", out], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == summary["final_test_acc"]
    assert f"accuracy {summary['final_test_acc']:.4f}" in stdout
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 449 == metrics["n"]
    assert np.trace(cm) / cm.sum() == metrics["accuracy"]
    from sklearn.metrics import precision_recall_fscore_support

    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    y = [int(r["true"]) for r in rows]
    p = [int(r["predicted"]) for r in rows]
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=list(range(10)), zero_division=0)
    for i in range(10):
        m = metrics["per_class"][str(i)]
        assert (m["precision"], m["recall"], m["f1"], m["support"]) == pytest.approx(
            (prec[i], rec[i], f1[i], sup[i])
        )
    with Image.open(out / "confusion_matrix.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    # the validation split is the run's own carved split: its accuracy is the last epoch's val_acc
    r = evaluate(load(run), None, "val")
    assert r["accuracy"] == summary["final_val_acc"] and r["data_name"] == "digits"


def test_evaluate_heldout_flat_folder_and_mismatched_classes(folder_run, tmp_path, capsys):
    run, data = folder_run
    held = tmp_path / "heldout"
    for c in ("cat", "dog"):  # a subset of the run's classes, flat layout ROOT/<class>/*
        shutil.copytree(data / "test" / c, held / c)
    code, stdout, err = cli(["evaluate", run, "--data", held], capsys)
    assert code == 0, err
    out = run / "eval-heldout-all"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["classes_not_in_data"] == ["fox"]
    assert (out / "confusion_matrix.png").is_file()
    fm = load(run)
    files = sorted(held.rglob("*.png"))
    pred = fm.predict_proba(files).argmax(1)
    truth = torch.tensor([fm.classes.index(f.parent.name) for f in files])
    assert metrics["accuracy"] == pytest.approx(float((pred == truth).double().mean()))
    assert np.array(metrics["confusion_matrix"]).sum() == 6
    (held / "wolf").mkdir()
    shutil.copy(files[0], held / "wolf" / "w.png")
    code, _, err = cli(["evaluate", run, "--data", held], capsys)
    assert code == 2 and "wolf" in err and "Traceback" not in err
    # the train/test layout: its test split
    code, stdout, err = cli(["evaluate", run, "--data", data, "--out", tmp_path / "e2"], capsys)
    assert code == 0, err
    e2 = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert e2["n"] == 9 and e2["accuracy"] == json.loads((run / "summary.json").read_text())["final_test_acc"]


def test_predict_table_labels_every_top_k_column():
    from rifle.commands.predict import _write

    rows = [("a.png", [("cat", 0.75), ("dog", 0.25)]), ("long/b.png", [("dog", 0.6), ("cat", 0.4)])]
    buf = io.StringIO()
    _write(rows, "table", buf)
    head, first, second = buf.getvalue().splitlines()
    assert head.split() == ["image", "prediction", "1", "probability", "prediction", "2", "probability"]
    assert first.split() == ["a.png", "cat", "0.7500", "dog", "0.2500"]
    # the columns line up: every probability ends where its header does
    for line in (first, second):
        assert [m.end() for m in re.finditer(r"\d\.\d{4}", line)] == [
            m.end() for m in re.finditer("probability", head)
        ]
    buf = io.StringIO()
    _write([("a.png", [("cat", 0.75)])], "table", buf)
    assert buf.getvalue().splitlines()[0].split() == ["image", "prediction", "probability"]


def test_star_import_leaves_the_inference_stack_unimported():
    code = (
        "import sys; from rifle import *; "
        "bad = [m for m in ('rifle.inference', 'timm') if m in sys.modules]; assert not bad, bad; "
        "assert Rifle and find_head and __version__; "
        "import rifle; assert callable(rifle.load) and 'rifle.inference' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
