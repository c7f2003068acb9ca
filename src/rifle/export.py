"""Export a fine-tuned run for other runtimes: ONNX or TorchScript, plus a preprocessing JSON beside it.

The exported graph maps normalised float32 ``[N, 3, S, S]`` to logits ``[N, C]``; the JSON says how to
get that input from an image and names the classes. Each export is loaded back and compared with the
PyTorch model (:func:`compare_logits`). Uses ``torch.onnx.export`` (dynamo, legacy exporter as fallback)
and ``torch.jit.trace``; the formats, the check and its tolerance: docs/inference.md.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inference import FineTunedModel, load
from .train.checkpoint import atomic_write_text

__all__ = [
    "export",
    "ExportResult",
    "ExportError",
    "FORMATS",
    "RTOL",
    "compare_logits",
    "sidecar_path",
    "preprocessing_spec",
    "verify",
]

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
RTOL = 1e-2  # of max(1, max |logit|); measured and justified in docs/inference.md
LEGACY_OPSET = 17


class ExportError(RuntimeError):
    """The model could not be exported, or the exported model disagrees with PyTorch."""


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    exporter: str
    max_abs_diff: float | None  # None: not checked (e.g. onnxruntime not installed)
    checked_with: str | None
    check: dict[str, Any] | None = None  # compare_logits' result


def sidecar_path(path: str | os.PathLike) -> Path:
    """The preprocessing JSON of a model file: its name plus ``.json`` (``model.onnx.json``), so files of
    two formats in one folder never share (and overwrite) one JSON."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def compare_logits(got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> dict[str, Any]:
    """How far exported logits ``got`` are from the reference ``ref`` (both ``[N, C]``).

    ``scale = max(1, max |ref|)``; ``max_rel_diff = max |got - ref| / scale``; ``ok`` when
    ``max_rel_diff <= rtol``. ``top1_agreement``: fraction of rows with the same argmax.
    """
    got, ref = got.double(), ref.double()
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max()) if ref.numel() else 0.0)
    top1 = float((got.argmax(1) == ref.argmax(1)).double().mean()) if len(ref) else 1.0
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale,
        "logit_scale": scale,
        "top1_agreement": top1,
        "rtol": rtol,
        "tolerance": rtol * scale,
        "ok": bool(diff <= rtol * scale),
    }


def preprocessing_spec(fm: FineTunedModel) -> dict[str, Any]:
    """How to turn an image into the exported model's input (the run's evaluation transform)."""
    p, s, r = fm.preprocessing, fm.image_size, fm.resolution
    off = round((r - s) / 2)
    return {
        "input_size": s,
        "resize": r,
        "interpolation": p.get("interpolation", "bilinear"),
        "mean": list(p["mean"]),
        "std": list(p["std"]),
        "scale": 1 / 255,
        "channel_order": "RGB",
        "layout": "NCHW",
        "grayscale": "replicate the single channel to 3 channels",
        "steps": [
            f"open with PIL; a JPEG is first downscaled in the DCT domain: img.draft(None, ({r}, {r})) "
            f"(by 1/2, 1/4 or 1/8 while both sides stay >= {r})",
            "modes 1, L, LA -> L (8-bit grayscale, 1 channel); I;16*, I -> round(v / 257), "
            "F -> round(v * 255 if max <= 1 else v), clipped to 0..255 as L; every other mode "
            "(CMYK, YCbCr, RGBA, P, ...) -> PIL convert('RGB') (alpha dropped, palette expanded); "
            "EXIF orientation not applied",
            f"resize the shorter side to {r} ({p.get('interpolation', 'bilinear')}, antialiased as PIL; "
            f"longer side int({r} * long / short))",
            f"centre crop {r}x{r} (offset round((size - {r}) / 2))",
            f"centre crop {s}x{s} (offset {off})",
            "x = pixel / 255; x = (x - mean) / std per channel; grayscale replicated to 3 channels",
            "float32, NCHW; the model outputs logits: softmax over axis 1 gives class probabilities",
        ],
    }


def _example(n: int, s: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path, exporter: str) -> str:
    names: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter in ("auto", "dynamo"):
        try:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
                **names,
            )
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - any torch.export / onnxscript failure
            if exporter == "dynamo":
                raise ExportError(f"ONNX export (dynamo) failed: {type(e).__name__}: {e}") from e
            warnings.warn(
                f"the dynamo ONNX exporter failed ({type(e).__name__}: {str(e)[:200]}); "
                f"using the legacy exporter",
                stacklevel=3,
            )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=LEGACY_OPSET,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **names,
            )
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"ONNX export (legacy) failed: {type(e).__name__}: {e}") from e
    return "legacy"


def _run_onnx(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return torch.from_numpy(out), f"onnxruntime {ort.__version__}"


def _torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(model, x, check_trace=False)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.jit.save(traced, str(tmp))
        os.replace(tmp, path)


def _run_torchscript(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(x), f"torch.jit.load (torch {torch.__version__})"


def verify(
    path: str | os.PathLike, model: nn.Module, image_size: int, format: str = "onnx", rtol: float = RTOL
) -> dict[str, Any] | None:
    """Run the exported file at ``path`` on a random batch of 3 and compare its logits with ``model``'s in
    float64 (float32 if the model cannot run in float64) by :func:`compare_logits`; raise
    :class:`ExportError` when they differ by more than ``rtol``. Returns the comparison, or ``None`` for
    ONNX when onnxruntime is not installed."""
    path = Path(path)
    net = copy.deepcopy(model).to("cpu").to(memory_format=torch.contiguous_format).float().eval()
    x3 = _example(3, image_size, 1)
    with torch.no_grad():
        ref32 = net(x3)
        try:
            ref, reference = copy.deepcopy(net).double()(x3.double()), "PyTorch, float64"
        except (RuntimeError, TypeError):  # a model that cannot run in float64 (hard-coded float32 ops)
            ref, reference = ref32, "PyTorch, float32"
    got = _run_onnx(path, x3) if format == "onnx" else _run_torchscript(path, x3)
    if got is None:
        return None
    y, runtime = got
    if tuple(y.shape) != tuple(ref.shape):
        raise ExportError(
            f"{path}: output shape {tuple(y.shape)} for a batch of 3, expected {tuple(ref.shape)}"
        )
    result = {
        "runtime": runtime,
        "reference": reference,
        **compare_logits(y, ref, rtol),
        "pytorch_float32_max_abs_diff": float((ref32.double() - ref).abs().max()),
    }
    if not result["ok"]:
        raise ExportError(
            f"{path}: {runtime} logits differ from {reference} on a random batch of 3: max abs diff "
            f"{result['max_abs_diff']:.3g}, max rel diff {result['max_rel_diff']:.3g} of the logit scale "
            f"max(1, max |logit|) = {result['logit_scale']:.3g} (tolerance {rtol:g}), top-1 agreement "
            f"{result['top1_agreement']:.0%}; PyTorch float32 itself differs by "
            f"{result['pytorch_float32_max_abs_diff']:.3g}"
        )
    return result


def export(
    model: FineTunedModel | str | os.PathLike,
    format: str = "onnx",
    out: str | os.PathLike | None = None,
    *,
    check: bool = True,
    exporter: str = "auto",
) -> ExportResult:
    """Export a run (folder or loaded :class:`FineTunedModel`) to ``out`` (default
    ``RUN_DIR/model.onnx`` or ``RUN_DIR/model.torchscript.pt``) and write the preprocessing JSON beside it.

    ``exporter`` (ONNX only): ``auto`` (dynamo, legacy if it fails), ``dynamo`` or ``legacy``.
    Raises :class:`ExportError` when the exported model's logits differ from PyTorch's by more than the
    tolerance (``check=True``).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ValueError(f"exporter must be auto, dynamo or legacy, got {exporter!r}")
    fm = model if isinstance(model, FineTunedModel) else load(model)
    if out is None:
        if fm.run_dir is None:
            raise ValueError("out is required for a model that was not loaded from a run folder")
        out = fm.run_dir / ("model" + FORMATS[format])
    path = Path(out).expanduser()
    if path.suffix.lower() == ".json":
        raise ValueError(
            f"--out {path}: the model file cannot be a .json (the preprocessing JSON goes beside it)"
        )
    if path.is_dir():
        raise ValueError(
            f"--out {path} is a folder; give a file name such as {path / ('model' + FORMATS[format])}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(fm.model).to("cpu").to(memory_format=torch.contiguous_format).float().eval()
    s = fm.image_size
    x = _example(2, s, 0)
    if format == "onnx":
        used = _export_onnx(net, x, path, exporter)
    else:
        _torchscript(net, x, path)
        used = "torch.jit.trace"
    result = verify(path, net, s, format) if check else None
    meta = {
        "format": format,
        "file": path.name,
        "exporter": used,
        "model": fm.config.get("model"),
        "run": str(fm.run_dir.resolve()) if fm.run_dir else None,
        "epoch": fm.epoch,
        "classes": list(fm.classes),
        "input": {"name": "input", "shape": ["batch", 3, s, s], "dtype": "float32"},
        "output": {
            "name": "logits",
            "shape": ["batch", fm.num_classes],
            "note": "logits; softmax over axis 1 gives probabilities in the order of classes",
        },
        "preprocessing": preprocessing_spec(fm),
        "check": result,  # None: not checked (--no-check, or onnxruntime missing)
    }
    sidecar = sidecar_path(path)
    atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    return ExportResult(
        path,
        sidecar,
        used,
        result["max_abs_diff"] if result else None,
        result["runtime"] if result else None,
        result,
    )
