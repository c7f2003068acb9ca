"""How far do exported models' logits drift from PyTorch's? The measurement behind ``rifle.export.RTOL``.

For each model, format (ONNX through both exporters, run by onnxruntime; TorchScript) and batch (random
N(0, 1) input as the export check uses, and real images), prints the max absolute logit difference from
PyTorch float32 (as rifle runs it) and from PyTorch float64, the max relative difference (of
``max(1, max |logit|)``, the check's scale), top-1 agreement, and onnxruntime with its graph
optimisations off (``ORT_DISABLE_ALL``: no conv+BN fusion, no NCHWc layout) and with 1 thread.

    python benchmarks/export_tolerance.py [--work /tmp/export-tolerance] [--size 224]

Models: tiny_cnn trained 2 epochs on digits; the guide's EfficientNet-Lite0 run (2 epochs at 32 px on a
generated folder); EfficientNet-Lite0 with its offline ImageNet weights (new 4-way head); timm resnet18
(random init). Real images: the runs' own test images, ELPV cells for the ImageNet-size models.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from rifle.export import RTOL, compare_logits, export

warnings.filterwarnings("ignore")


def _folder(root: Path) -> Path:
    """The guide test's generated folder (tests/conftest.py make_image_folder, 2 classes, 40x36)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        for c, name in enumerate(("cat", "dog")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(36, 40, 3), dtype=np.uint8)
                arr[..., c % 3] += 150
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _elpv(n: int) -> list[Path]:
    import elpv_dataset

    return sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))[:: 2624 // n][:n]


def models(work: Path, size: int):
    from rifle.cli import main
    from rifle.evaluation import load_eval_split
    from rifle.inference import FineTunedModel, load
    from rifle.models import create_model, model_preprocessing

    run = work / "tiny_cnn-digits"
    if not (run / "summary.json").is_file():
        main(
            [
                "train",
                "--data",
                "digits",
                "--model",
                "tiny_cnn",
                "--image-size",
                "16",
                "--epochs",
                "2",
                "--out",
                str(run),
                "--quiet",
            ]
        )
    fm = load(run)
    yield "tiny_cnn, digits, 2 epochs", fm, list(load_eval_split(fm, "digits").images.images[:16])
    run = work / "guide-lite0"
    if not (run / "summary.json").is_file():
        main(
            [
                "train",
                "--data",
                str(_folder(work / "my_photos")),
                "--preset",
                "cpu",
                "--method",
                "rifle",
                "--reinits",
                "1",
                "--seed",
                "0",
                "--out",
                str(run),
                "--epochs",
                "2",
                "--image-size",
                "32",
                "--batch-size",
                "8",
                "--min-steps-after",
                "0",
                "--quiet",
            ]
        )
    fm = load(run)
    yield (
        "efficientnet_lite0, guide run (32 px, 2 epochs)",
        fm,
        [fm.decode(p) for p in sorted((work / "my_photos/test").rglob("*.png"))],
    )
    for name, pretrained in (("efficientnet_lite0", True), ("resnet18", False)):
        torch.manual_seed(0)
        model = create_model(name, 4, pretrained=pretrained)
        prep = {**model_preprocessing(model), "image_size": size, "resize": round(size * 8 / 7)}
        fm = FineTunedModel(model, ["a", "b", "c", "d"], prep)
        label = f"{name}, {'ImageNet weights' if pretrained else 'random init'} ({size} px)"
        yield label, fm, [fm.decode(p) for p in _elpv(8)]


def _ort(path: Path, x: torch.Tensor, level: str = "ORT_ENABLE_ALL", threads: int = 0) -> torch.Tensor:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the trained runs (default: a temporary one)")
    ap.add_argument("--size", type=int, default=224, help="input size of the ImageNet-size models")
    args = ap.parse_args()
    import onnxruntime

    work = Path(args.work or tempfile.mkdtemp(prefix="export-tolerance-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} "
        f"torch threads; RTOL = {RTOL:g}\n"
    )
    print(
        "| model | batch | format | max abs diff vs torch fp32 | vs torch fp64 | max rel diff (fp64) "
        "| top-1 agreement | torch fp32 vs fp64 | ORT no graph opt. / 1 thread (vs fp64) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for label, fm, real in models(work, args.size):
        net = copy.deepcopy(fm.model).float().eval()
        net64 = copy.deepcopy(net).to(memory_format=torch.contiguous_format).double()
        s = fm.image_size
        batches = {
            "random N(0,1) x8": torch.randn(8, 3, s, s, generator=torch.Generator().manual_seed(1)),
            f"real images x{len(real)}": torch.cat(list(fm.normalized_batches(real, len(real)))),
        }
        files = {}
        for fmt, exporter in (("onnx", "dynamo"), ("onnx", "legacy"), ("torchscript", "auto")):
            out = work / "exports" / f"{label.split(',')[0]}-{exporter}"
            files[(fmt, exporter)] = export(
                fm, fmt, f"{out}.{'onnx' if fmt == 'onnx' else 'pt'}", check=False, exporter=exporter
            ).path
        for bname, x in batches.items():
            x = x.contiguous()
            with torch.no_grad():
                ref32, ref64 = fm.logits(x), net64(x.double())
            own = float((ref32.double() - ref64).abs().max())
            for (fmt, exporter), path in files.items():
                if fmt == "onnx":
                    got = _ort(path, x)
                    extra = " / ".join(
                        f"{compare_logits(_ort(path, x, *o), ref64)['max_abs_diff']:.1e}"
                        for o in (("ORT_DISABLE_ALL", 0), ("ORT_ENABLE_ALL", 1))
                    )
                else:
                    with torch.no_grad():
                        got = torch.jit.load(str(path))(x)
                    extra = ""
                c32, c64 = compare_logits(got, ref32), compare_logits(got, ref64)
                worst = max(worst, c64["max_rel_diff"])
                name = f"ONNX ({exporter})" if fmt == "onnx" else "TorchScript"
                print(
                    f"| {label} | {bname} | {name} | {c32['max_abs_diff']:.1e} | {c64['max_abs_diff']:.1e} | "
                    f"{c64['max_rel_diff']:.1e} | {c64['top1_agreement']:.0%} | {own:.1e} | {extra} |"
                )
    print(
        f"\nlargest max rel diff (vs fp64): {worst:.2e}; "
        f"RTOL {RTOL:g} is {RTOL / max(worst, 1e-12):.0f}x that"
    )


if __name__ == "__main__":
    main()
