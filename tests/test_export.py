"""rifle export: ONNX (onnxruntime) and TorchScript logits match PyTorch; the JSON describes the input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from rifle.cli import main
from rifle.export import ATOL, export
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
    run_train(resolve({"model": "tiny_cnn", "image_size": 16, "batch_size": 16, "epochs": 1, "data": str(data),
                       "out": str(out), "min_steps_after": 0}), log=lambda s: None, progress=False)
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
    a = a[top:top + r, left:left + r]
    o = round((r - s) / 2)
    a = a[o:o + s, o:o + s] * p["scale"]
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
    onnx_path, meta_path = run / "model.onnx", run / "model.json"
    assert "onnxruntime" in out and onnx_path.is_file() and meta_path.is_file()
    meta = json.loads(meta_path.read_text())
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["format"] == "onnx"
    assert meta["input"]["shape"] == ["batch", 3, 16, 16] and meta["preprocessing"]["resize"] == 18
    assert meta["check"]["max_abs_diff"] <= ATOL
    # the JSON recipe reproduces rifle's preprocessing
    for f, xi in zip(files, x):
        torch.testing.assert_close(_prep_from_json(meta, f), xi, rtol=0, atol=1e-5)
    for n in (1, len(files)):  # dynamic batch axis
        got = _onnx_logits(onnx_path, x[:n])
        assert (got - ref[:n]).abs().max() <= ATOL
    ts = tmp_path / "sub" / "m.torchscript.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(ts)]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "sub" / "m.json").read_text())["format"] == "torchscript"
    loaded = torch.jit.load(str(ts))
    with torch.no_grad():
        assert (loaded(x) - ref).abs().max() <= ATOL
    # the legacy exporter works as well
    res = export(fm, "onnx", tmp_path / "legacy.onnx", exporter="legacy")
    assert res.exporter == "legacy" and (_onnx_logits(res.path, x) - ref).abs().max() <= ATOL
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
    assert res.exporter == "dynamo" and res.max_abs_diff <= ATOL * max(1, float(ref.abs().max()))
    assert (_onnx_logits(res.path, x) - ref).abs().max() <= ATOL
    res = export(fm, "torchscript", tmp_path / "lite0.torchscript.pt")
    with torch.no_grad():
        assert (torch.jit.load(str(res.path))(x) - ref).abs().max() <= ATOL
    assert json.loads((tmp_path / "lite0.json").read_text())["preprocessing"]["mean"] == pytest.approx(
        list(prep["mean"]))
