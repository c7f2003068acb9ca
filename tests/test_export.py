"""rifle export: ONNX (onnxruntime) and TorchScript logits match PyTorch; the JSON describes the input."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from rifle.cli import main
from rifle.export import RTOL, ExportError, export, verify
from rifle.inference import FineTunedModel, load

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from rifle.config import resolve
    from rifle.run import run_train

    base = tmp_path_factory.mktemp("export")
    data = make_image_folder(base / "data")
    out = base / "run"
    run_train(
        resolve(
            {
                "model": "tiny_cnn",
                "image_size": 16,
                "batch_size": 16,
                "epochs": 1,
                "data": str(data),
                "out": str(out),
                "min_steps_after": 0,
            }
        ),
        log=lambda s: None,
        progress=False,
    )
    return out, data


def _onnx_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def _prep_from_json(meta, path):
    """The exported JSON's recipe, implemented independently with PIL + numpy."""
    p = meta["preprocessing"]
    r, s = p["resize"], p["input_size"]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((r, int(r * h / w)) if w <= h else (int(r * w / h), r), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    top, left = round((a.shape[0] - r) / 2), round((a.shape[1] - r) / 2)
    a = a[top : top + r, left : left + r]
    o = round((r - s) / 2)
    a = a[o : o + s, o : o + s] * p["scale"]
    a = (a - np.array(p["mean"], dtype=np.float32)) / np.array(p["std"], dtype=np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def test_export_cli_onnx_and_torchscript_match_pytorch(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    fm = load(run)
    files = sorted((data / "test").rglob("*.png"))
    x = fm.preprocess(files).contiguous()
    with torch.inference_mode():
        ref = fm.logits(x)
    assert main(["export", str(run)]) == 0
    out, _ = capsys.readouterr()
    onnx_path, meta_path = run / "model.onnx", run / "model.onnx.json"
    assert "onnxruntime" in out and onnx_path.is_file() and meta_path.is_file()
    meta = json.loads(meta_path.read_text())
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["format"] == "onnx"
    assert meta["input"]["shape"] == ["batch", 3, 16, 16] and meta["preprocessing"]["resize"] == 18
    check = meta["check"]
    assert check["ok"] and check["max_abs_diff"] <= 1e-5 and check["top1_agreement"] == 1.0
    # the check's numbers, recomputed here on its batch (3 images, seed 1) with onnxruntime and a float64
    # copy of the model: max |onnx - torch| and the logit scale max(1, max |logit|)
    x3 = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref64 = copy.deepcopy(fm.model).cpu().double()(x3.double())
    diff = float((_onnx_logits(onnx_path, x3).double() - ref64).abs().max())
    scale = max(1.0, float(ref64.abs().max()))
    assert 0 < diff <= 1e-5 and check["max_abs_diff"] == pytest.approx(diff, rel=1e-9)
    assert check["logit_scale"] == pytest.approx(scale, rel=1e-12)
    assert check["max_rel_diff"] == pytest.approx(diff / scale, rel=1e-9)
    assert check["rtol"] == RTOL and "max rel diff" not in out and "top-1 agreement 100%" in out
    # the JSON recipe reproduces rifle's preprocessing
    for f, xi in zip(files, x):
        torch.testing.assert_close(_prep_from_json(meta, f), xi, rtol=0, atol=1e-5)
    for n in (1, len(files)):  # dynamic batch axis
        got = _onnx_logits(onnx_path, x[:n])
        assert (got - ref[:n]).abs().max() <= 1e-5
    ts = tmp_path / "sub" / "m.torchscript.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(ts)]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "sub" / "m.torchscript.pt.json").read_text())["format"] == "torchscript"
    loaded = torch.jit.load(str(ts))
    with torch.no_grad():
        assert (loaded(x) - ref).abs().max() <= 1e-5
    # the legacy exporter works as well
    res = export(fm, "onnx", tmp_path / "legacy.onnx", exporter="legacy")
    assert res.exporter == "legacy" and (_onnx_logits(res.path, x) - ref).abs().max() <= 1e-5
    code = main(["export", str(run), "--out", str(tmp_path / "x.json")])
    assert code == 2 and ".json" in capsys.readouterr()[1]


def test_export_efficientnet_lite0_pretrained(tmp_path):
    """EfficientNet-Lite0 with its offline ImageNet weights and a 4-way head: ONNX and TorchScript."""
    from rifle.models import create_model, model_preprocessing

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 4, pretrained=True)
    prep = {**model_preprocessing(model), "image_size": 64, "resize": 73}
    fm = FineTunedModel(model, ["a", "b", "c", "d"], prep, channels_last=False)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ref = fm.logits(x)
    res = export(fm, "onnx", tmp_path / "lite0.onnx")
    assert res.exporter == "dynamo" and res.max_abs_diff <= 1e-5
    assert (_onnx_logits(res.path, x) - ref).abs().max() <= 1e-5
    res = export(fm, "torchscript", tmp_path / "lite0.torchscript.pt")
    with torch.no_grad():
        assert (torch.jit.load(str(res.path))(x) - ref).abs().max() <= 1e-5
    assert json.loads((tmp_path / "lite0.torchscript.pt.json").read_text())["preprocessing"][
        "mean"
    ] == pytest.approx(list(prep["mean"]))


def _head_bias_initializer(onnx_model, bias):
    from onnx import numpy_helper

    found = [
        t
        for t in onnx_model.graph.initializer
        if tuple(t.dims) == tuple(bias.shape) and np.allclose(numpy_helper.to_array(t), bias.numpy())
    ]
    assert len(found) == 1, [t.name for t in found]
    return found[0]


def test_check_catches_a_wrong_export(tiny_run, tmp_path):
    """The tolerance is not so loose that a genuinely wrong file passes: a head bias moved by 3x the
    tolerance, or the right file checked against another model, fails; 0.3x the tolerance passes."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    run, _ = tiny_run
    fm = load(run)
    res = export(fm, "onnx", tmp_path / "m.onnx")
    tol = res.check["tolerance"]
    assert res.check["ok"] and tol == pytest.approx(RTOL * res.check["logit_scale"])
    bias = [p for n, p in fm.model.named_parameters() if n.endswith("bias")][-1].detach().cpu()
    for factor, fails in ((3.0, True), (0.3, False)):
        m = onnx.load(str(res.path))
        init = _head_bias_initializer(m, bias)
        arr = numpy_helper.to_array(init).copy()
        arr[1] += factor * tol
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        bad = tmp_path / f"perturbed-{factor}.onnx"
        onnx.save(m, str(bad))
        if fails:
            with pytest.raises(ExportError, match=r"max abs diff .*max rel diff .*top-1 agreement"):
                verify(bad, fm.model, fm.image_size)
        else:
            assert verify(bad, fm.model, fm.image_size)["max_abs_diff"] == pytest.approx(0.3 * tol, rel=1e-3)
    other = copy.deepcopy(fm.model)
    torch.manual_seed(1)
    for mod in other.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.reset_parameters()
    with pytest.raises(ExportError, match="differ from PyTorch"):
        verify(res.path, other, fm.image_size)
    ts = export(fm, "torchscript", tmp_path / "m.torchscript.pt")
    with pytest.raises(ExportError, match="torch.jit.load"):
        verify(ts.path, other, fm.image_size, "torchscript")


def test_check_is_immune_to_pytorch_reduced_precision_modes(tiny_run, tmp_path):
    """oneDNN's bf16 fast-math mode (ONEDNN_DEFAULT_FPMATH_MODE=BF16, e.g. set machine-wide) makes PyTorch's
    float32 convolutions ~1e-2 off on CPUs with bf16 (AMX / AVX512-BF16); the check's float64 reference is
    not affected, so a correct export still passes (with a float32 reference it failed here by 0.019)."""
    import os
    import subprocess
    import sys

    run, _ = tiny_run
    env = {**os.environ, "ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "rifle", "export", str(run), "--out", str(tmp_path / "m.onnx")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "m.onnx.json").read_text())["check"]["max_abs_diff"] < 1e-5


def test_two_formats_in_one_folder_keep_their_own_sidecars(tiny_run, tmp_path, capsys):
    """ONNX and TorchScript exported into one folder: each file has its own JSON, naming that file."""
    run, _ = tiny_run
    for fmt, name in (
        ("onnx", "model.onnx"),
        ("torchscript", "model.torchscript.pt"),
        ("torchscript", "model.pt"),
    ):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        assert f"{tmp_path / name}.json" in capsys.readouterr().out
    for fmt, name in (
        ("onnx", "model.onnx"),
        ("torchscript", "model.torchscript.pt"),
        ("torchscript", "model.pt"),
    ):
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert (meta["format"], meta["file"]) == (fmt, name) and meta["check"]["ok"]
    assert not (tmp_path / "model.json").exists()


def _awkward_images(d):
    """A 16-bit grayscale PNG, a CMYK JPEG, a 1600x1200 RGB JPEG, an RGBA PNG and a palette PNG with
    transparency."""
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65535, size=(30, 40)).astype(np.uint16)
    a16[:, :20] = np.linspace(0, 65535, 20).astype(np.uint16)[None]
    Image.fromarray(a16).save(d / "gray16.png")
    assert Image.open(d / "gray16.png").mode == "I;16"
    cmyk = rng.integers(0, 255, size=(36, 44, 4), dtype=np.uint8)
    cmyk[..., 1] //= 4
    Image.fromarray(cmyk, mode="CMYK").save(d / "cmyk.jpg", quality=95)
    yy, xx = np.mgrid[0:1200, 0:1600]
    big = np.stack([xx * 255 // 1600, yy * 255 // 1200, (xx + yy) % 256], -1)
    big = np.clip(big + rng.integers(-40, 40, size=big.shape), 0, 255).astype(np.uint8)
    big[..., 0] = np.maximum(big[..., 0], 150)
    Image.fromarray(big).save(d / "large.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, size=(25, 30, 4), dtype=np.uint8)).save(d / "rgba.png")
    pal = Image.fromarray(rng.integers(0, 255, size=(30, 25, 3), dtype=np.uint8)).convert(
        "P", palette=Image.ADAPTIVE
    )
    pal.save(d / "palette.png", transparency=3)
    return ["gray16.png", "cmyk.jpg", "large.jpg", "rgba.png", "palette.png"]


def test_docs_onnx_example_matches_rifle_predict(tiny_run, tmp_path, capsys):
    """docs/inference.md's onnxruntime + PIL + numpy example (executed as written, paths substituted) gives
    `rifle predict`'s probabilities on images whose decoding is easy to get wrong."""
    import re
    from pathlib import Path

    run, _ = tiny_run
    doc = (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "def load_input" in b)
    res = export(run, "onnx", tmp_path / "model.onnx")
    names = _awkward_images(tmp_path)
    assert (
        main(["predict", str(run), *[str(tmp_path / n) for n in names], "--format", "json", "--top-k", "3"])
        == 0
    )
    predicted = {
        Path(r["path"]).name: {p["class"]: p["probability"] for p in r["predictions"]}
        for r in json.loads(capsys.readouterr().out)
    }
    meta = json.loads(res.sidecar.read_text())
    classes, steps = meta["classes"], meta["preprocessing"]["steps"]
    assert "img.draft(None, (18, 18))" in steps[0] and "round(v / 257)" in steps[1] and "CMYK" in steps[1]
    for name in names:
        code = (
            block.replace("/tmp/run/model.onnx.json", str(res.sidecar))
            .replace("/tmp/run/model.onnx", str(res.path))
            .replace("photo.png", str(tmp_path / name))
        )
        ns = {"__name__": "doc_example"}
        exec(compile(code, "docs/inference.md", "exec"), ns)
        capsys.readouterr()
        got = dict(zip(classes, ns["probs"][0].tolist()))
        assert max(abs(got[c] - predicted[name][c]) for c in classes) <= 1e-4, (name, got, predicted[name])


class _Float32Only(torch.nn.Module):
    """A head that hard-codes a float32 tensor, so the model cannot run in float64."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3)) @ torch.eye(4, 2, dtype=torch.float32)


def test_check_falls_back_to_float32_for_a_model_that_cannot_run_in_float64(tmp_path):
    torch.manual_seed(0)
    model = _Float32Only()
    with pytest.raises(RuntimeError):
        model.double()(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    fm = FineTunedModel(
        model.float(),
        ["a", "b"],
        {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 8, "resize": 9},
        channels_last=False,
    )
    res = export(fm, "onnx", tmp_path / "m.onnx")
    assert res.check["reference"] == "PyTorch, float32" and res.check["ok"] and res.max_abs_diff < 1e-5
