"""Backprop in depth: how far each layer moved from its pretrained weights, and its gradients at re-inits.

RIFLE's claim (Li et al., ICML 2020, arXiv 2007.03349, §3-4): with a fixed random head the loss and the
back-propagated error shrink early and the lower layers barely move; re-initialising the head makes the
error large again so that the *deep* (early) layers get meaningful updates. Two measurements:

* the relative weight change of every conv / linear weight tensor,
  ``r_l = ||W_l(T) - W_l(0)|| / ||W_l(0)||`` (Frobenius norms), where ``W_l(0)`` is the weight at the
  start of fine-tuning: the pretrained backbone and the run's first random head, rebuilt exactly as
  :func:`rifle.run.run_train` builds it (``torch.manual_seed(derive_seed(seed, "model"))`` then
  ``create_model(model, num_classes, pretrained=..., **method model kwargs)``). Layers are the
  ``nn.Conv{1,2,3}d`` / ``nn.Linear`` modules in registration order (``model.named_modules()``; for
  timm / torchvision CNNs this is the forward order, stem first, head last). For the head, ``r`` is
  measured from its first init (RIFLE redraws it, so its ``r`` is not a training distance).
  :func:`run_depth` computes it from a run's final checkpoint (``rifle analyze RUN``);
* :class:`DepthMonitor`, a trainer plug-in (``kind = "monitor"``, not registered, so not a CLI
  method) that records ``r_l`` after every epoch and the per-layer gradient norms ``||dL/dW_l||`` in the
  ``window`` optimizer steps just before and just after each re-init epoch, into ``depth.jsonl``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.heads import in_head
from ..methods.base import Method, RunContext

DEPTH_JSON = "depth.json"
DEPTH_JSONL = "depth.jsonl"
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ------------------------------------------------------------------------------------------ pure parts
def tracked_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``[(state-dict key of the weight, layer kind), ...]`` for conv / linear layers, in module order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor):
            out.append((f"{name}.weight" if name else "weight", type(m).__name__))
    return out


def relative_change(current: torch.Tensor, reference: torch.Tensor) -> float:
    """``||current - reference|| / ||reference||`` in float64 (``inf`` when the reference is zero)."""
    cur, ref = current.detach().double().cpu(), reference.detach().double().cpu()
    num, den = float(torch.linalg.vector_norm(cur - ref)), float(torch.linalg.vector_norm(ref))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def layer_profile(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                  names: Sequence[str]) -> list[float]:
    """Relative change of each named tensor of ``state`` against ``reference``."""
    missing = [n for n in names if n not in state or n not in reference]
    if missing:
        raise KeyError(f"tensors missing from the checkpoint or the reference model: {missing[:5]}")
    return [relative_change(state[n], reference[n]) for n in names]


def monitor_epochs(config: dict[str, Any], epochs: int) -> list[int]:
    """The epochs at whose start RIFLE re-initialises (or would, with the config's K, for fine-tuning)."""
    from ..core.schedule import make_schedule
    try:
        k = int(config.get("reinits", 0) or 0)
        if k < 1:
            return []
        return list(make_schedule(epochs, k, config.get("guard"), warn=False).points)
    except (ValueError, TypeError):
        return []


# ------------------------------------------------------------------------------------------ runs
def _read_config(run_dir: Path) -> dict[str, Any]:
    import yaml
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run folder?)")
    return yaml.safe_load(p.read_text()) or {}


def run_label(run_dir: str | Path, config: dict[str, Any] | None = None) -> str:
    config = config if config is not None else _read_config(Path(run_dir))
    g = (config.get("extra") or {}).get("grid")
    if isinstance(g, dict) and "label" in g:
        return f"{g['label']} s{g.get('seed', config.get('seed'))}"
    return f"{config.get('method', '?')} ({Path(run_dir).name})"


def build_reference(config: dict[str, Any], num_classes: int) -> nn.Module:
    """The model exactly as ``run_train`` built it before training (pretrained backbone, first head)."""
    from ..build import build_methods, initial_model
    from ..config import from_dict
    cfg = from_dict(config)
    methods = build_methods(cfg)
    with torch.random.fork_rng(devices=[]):
        return initial_model(cfg, num_classes, methods)


def load_run_model(run_dir: str | Path, *, pretrained: bool = False) -> tuple[nn.Module, dict[str, Any], dict]:
    """``(model with the final checkpoint's weights, config, checkpoint metadata)``."""
    from ..train.checkpoint import WEIGHTS, load_weights, read_weights
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    wpath = run_dir / WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS} (the run has not finished an epoch)")
    raw_meta, tensors = read_weights(wpath)  # checksum verified
    meta = {k: (json.loads(v) if k != "epoch" else int(v)) for k, v in raw_meta.items()}
    n = int(meta.get("num_classes") or len(meta.get("classes") or []))
    if pretrained:
        model = build_reference(config, n)
    else:
        from ..build import blank_model
        from ..config import from_dict
        model = blank_model(from_dict(config), n)
    load_weights(model, tensors, str(wpath))
    return model, config, meta


def run_depth(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """Per-layer relative weight change of a run's final checkpoint; writes ``depth.json``."""
    from ..core.heads import find_head, head_names
    from ..train.checkpoint import WEIGHTS, check_finite, read_weights
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    wpath = run_dir / WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"{run_dir}: no {WEIGHTS} (the run has not finished an epoch)")
    meta, tensors = read_weights(wpath)  # checksum verified
    n = int(json.loads(meta["num_classes"])) if "num_classes" in meta else len(json.loads(meta["classes"]))
    reference = build_reference(config, n)
    heads = head_names(reference, find_head(reference, config["head"].split(",") if config.get("head") else None))
    layers = tracked_layers(reference)
    names = [n for n, _ in layers]
    ref_state = reference.state_dict()
    check_finite(tensors, str(wpath), order=ref_state)
    r = layer_profile(tensors, ref_state, names)
    out = {"run": str(run_dir), "label": run_label(run_dir, config), "model": config.get("model"),
           "method": config.get("method"), "epoch": int(meta.get("epoch", -1)),
           "reference": "pretrained backbone + the run's first head init",
           "layers": [{"index": i, "name": name, "kind": kind,
                       "numel": int(ref_state[name].numel()), "rel_change": v,
                       "head": in_head(name, heads)}
                      for i, ((name, kind), v) in enumerate(zip(layers, r))]}
    if write:
        from ..train.checkpoint import atomic_write_text
        atomic_write_text(run_dir / DEPTH_JSON, json.dumps(out, indent=1) + "\n")
    return out


def read_monitor(run_dir: str | Path) -> dict[str, Any] | None:
    """``depth.jsonl`` as ``{"header": {...}, "weights": [...], "grad": [...]}`` (None if absent)."""
    p = Path(run_dir) / DEPTH_JSONL
    if not p.is_file():
        return None
    out: dict[str, Any] = {"header": None, "weights": [], "grad": []}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("type") == "layers":
            out["header"] = rec
        elif rec.get("type") in ("weights", "grad"):
            out[rec["type"]].append(rec)
    return out


def monitor_depth(run_dir: str | Path, mon: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`run_depth`'s result from the run's ``depth.jsonl`` (its last recorded epoch), no checkpoint needed."""
    mon = mon if mon is not None else read_monitor(run_dir)
    if not mon or not mon.get("header") or not mon.get("weights"):
        return None
    h, last = mon["header"], mon["weights"][-1]
    return {"run": str(run_dir), "label": run_label(run_dir), "method": h.get("method"), "epoch": last["epoch"],
            "reference": "pretrained backbone + the run's first head init (depth.jsonl)",
            "layers": [{"index": i, "name": n, "kind": k, "numel": int(c), "rel_change": v, "head": hd}
                       for i, (n, k, c, v, hd) in enumerate(zip(h["names"], h["kinds"], h["numel"],
                                                                last["rel_change"], h["head"]))]}


def load_profile(run_dir: str | Path, mon: dict[str, Any] | None = None) -> list[float] | None:
    """The final per-layer relative change: ``depth.json`` if written, else the monitor's last epoch
    (``mon``: the run's :func:`read_monitor` result when already read)."""
    p = Path(run_dir) / DEPTH_JSON
    if p.is_file():
        return [layer["rel_change"] for layer in json.loads(p.read_text())["layers"]]
    mon = mon if mon is not None else read_monitor(run_dir)
    if mon and mon["weights"]:
        return list(mon["weights"][-1]["rel_change"])
    return None


def backbone_thirds(values: Sequence[float], head: Sequence[bool]) -> list[float]:
    """Mean of ``values`` over the first / middle / last third of the backbone (head layers left out).

    The thirds are contiguous in forward order; the middle one takes the remainder
    (49 layers: 16 / 17 / 16).
    """
    body = [float(v) for v, h in zip(values, head) if not h]
    if not body:
        raise ValueError("no backbone layers (every tracked layer is in the head)")
    third = max(1, len(body) // 3)
    parts = [body[:third], body[third:len(body) - third] or body[third - 1:third], body[len(body) - third:]]
    return [sum(x) / len(x) for x in parts]


def grad_window_means(mon: dict[str, Any]) -> dict[int, dict[str, tuple[list[float], int]]]:
    """Per watched (re-init) epoch: ``{"before": (mean norm per layer, steps), "after": (...)}``.

    ``before`` = the recorded steps with ``offset < 0``, ``after`` = ``offset >= 0``; records with a
    missing norm are left out, and a side without records is absent.
    """
    grads = [g for g in mon.get("grad", []) if all(v is not None for v in g["norms"])]
    out: dict[int, dict[str, tuple[list[float], int]]] = {}
    for e in sorted({g["reinit_epoch"] for g in grads}):
        for side in ("before", "after"):
            recs = [g["norms"] for g in grads if g["reinit_epoch"] == e and (g["offset"] < 0) == (side == "before")]
            if recs:
                out.setdefault(e, {})[side] = ([sum(col) / len(recs) for col in zip(*recs)], len(recs))
    return out


def gradient_ratios(mon: dict[str, Any]) -> list[float | None] | None:
    """Per layer: mean gradient norm in the recorded steps after / before the watched epoch boundaries.

    For each watched (re-init) epoch, ``mean(after) / mean(before)`` per layer (:func:`grad_window_means`),
    then averaged over the watched epochs. None without an epoch recorded on both sides; a layer whose
    ``before`` mean is 0 gets None.
    """
    per_epoch = [[a / b if b > 0 else None for a, b in zip(w["after"][0], w["before"][0])]
                 for w in grad_window_means(mon).values() if "before" in w and "after" in w]
    if not per_epoch:
        return None
    out: list[float | None] = []
    for col in zip(*per_epoch):
        vals = [v for v in col if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def summarize_monitor(mon: dict[str, Any] | None) -> dict[str, Any] | None:
    """The numbers behind "does it move the lower layers more?" for one run's ``depth.jsonl``.

    ``rel_change``: mean relative weight change (last recorded epoch) of the first / middle / last
    backbone third; ``head_rel_change``; ``grad_ratio``: :func:`gradient_ratios` per third and
    ``head_grad_ratio`` (None when no gradients were recorded); ``watch_epochs``.
    """
    if not mon or not mon.get("header") or not mon.get("weights"):
        return None
    head = mon["header"]["head"]
    rel = mon["weights"][-1]["rel_change"]
    out: dict[str, Any] = {"rel_change": backbone_thirds(rel, head), "epoch": mon["weights"][-1]["epoch"],
                           "head_rel_change": _mean_of([v for v, h in zip(rel, head) if h]),
                           "grad_ratio": None, "head_grad_ratio": None,
                           "watch_epochs": mon["header"].get("watch_epochs")}
    ratios = gradient_ratios(mon)
    if ratios is not None:
        pairs = [(r, h) for r, h in zip(ratios, head) if r is not None]
        if any(not h for _, h in pairs):
            out["grad_ratio"] = backbone_thirds([r for r, _ in pairs], [h for _, h in pairs])
        out["head_grad_ratio"] = _mean_of([r for r, h in pairs if h])
    return out


def _mean_of(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------ plots
LAYER_AXIS = "layer (conv / linear weights, input side -> head; x = head)"


def finish_depth_axes(fig: Any, ax: Any, path: str | Path, title: str, xlabel: str,
                      ylabel: str = "‖W(T) − W(0)‖ / ‖W(0)‖") -> None:
    """The common look of every by-layer plot (log y, labels, legend), then save."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(ax.get_lines()) > 8:  # many runs: the legend beside the axes, not over the curves
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def plot_profiles(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Overlay :func:`run_depth` results (one line per run); the head's layers are marked with x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=90)
    for res in results:
        _plot_by_layer(ax, [max(layer["rel_change"], 1e-12) for layer in res["layers"]],
                       [layer["head"] for layer in res["layers"]], res["label"])
    finish_depth_axes(fig, ax, path, title or "relative weight change by depth", LAYER_AXIS)
    plt.close(fig)


def plot_monitor(mon: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Two panels: r_l after each epoch; mean gradient norm per layer before / after each re-init."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4), dpi=90)
    cmap = matplotlib.colormaps["viridis"]
    rows = mon["weights"]
    for j, rec in enumerate(rows):
        a.plot([max(v, 1e-12) for v in rec["rel_change"]], color=cmap(j / max(1, len(rows) - 1)), lw=1,
               label=f"epoch {rec['epoch']}" if j in (0, len(rows) - 1) else None)
    a.set_yscale("log")
    a.set_title("relative weight change after each epoch", fontsize=9)
    a.set_xlabel("layer (input side -> head)", fontsize=8)
    for r, sides in grad_window_means(mon).items():
        for side, ls in (("before", "--"), ("after", "-")):
            if side in sides:
                mean, steps = sides[side]
                b.plot([max(v, 1e-12) for v in mean], ls=ls, lw=1.1, label=f"epoch {r}: {steps} steps {side}")
    b.set_yscale("log")
    b.set_title("gradient norm per layer around each re-init epoch", fontsize=9)
    b.set_xlabel("layer (input side -> head)", fontsize=8)
    for ax in (a, b):
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_gradient_ratios(ratios: dict[str, list[float | None]], head: Sequence[bool], path: str | Path,
                         title: str = "") -> None:
    """One line per run: :func:`gradient_ratios` by layer (after / before the re-init; 1 = unchanged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=90)
    for label, ys in ratios.items():
        _plot_by_layer(ax, ys, head, label)
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    finish_depth_axes(fig, ax, path, title or "gradient norm just after / just before the re-init epoch boundary",
                      LAYER_AXIS, ylabel="grad norm after / before")
    plt.close(fig)


def _plot_by_layer(ax: Any, ys: Sequence[float | None], head: Sequence[bool], label: str) -> None:
    """One line by layer index (None values skipped), the head's layers marked with x."""
    xs = [i for i, v in enumerate(ys) if v is not None]
    line, = ax.plot(xs, [ys[i] for i in xs], lw=1.2, label=label)
    heads = [i for i in xs if i < len(head) and head[i]]
    ax.plot(heads, [ys[i] for i in heads], "x", color=line.get_color())


# ------------------------------------------------------------------------------------------ monitor
class DepthMonitor(Method):
    """Record per-layer weight change every epoch and gradient norms around re-inits (``depth.jsonl``).

    Not registered: the run wiring adds it to the trainer's method list (after the run's methods).
    It changes nothing in training (no RNG draws, no loss terms): monitored and unmonitored runs
    produce identical metrics.

    * weights: after each epoch's optimizer steps, at the first evaluation forward of the epoch (a
      forward pre-hook on the model that fires in eval mode), one norm per weight tensor;
    * gradients: ``Tensor.register_post_accumulate_grad_hook`` on every tracked weight, i.e. the
      gradient of the full loss (method terms included) after ``backward`` and before
      ``optimizer.step()`` (with gradient accumulation: the accumulated gradient; under fp16 AMP the
      gradient is still multiplied by the loss scale). Recorded for global steps in
      ``[e*S - window, e*S + window)`` for each watched epoch ``e`` (``S`` steps per epoch): the
      re-init epochs of a RIFLE run; for other methods the epochs RIFLE would use with the run's
      ``reinits`` (``epochs=`` overrides).

    Records (one JSON object per line): ``{"type": "layers", "names", "kinds", "numel", "head",
    "watch_epochs", "window", "steps_per_epoch"}`` once; ``{"type": "weights", "epoch", "rel_change"}``
    per epoch; ``{"type": "grad", "epoch", "step", "reinit_epoch", "offset", "norms"}`` per watched step
    (``offset`` = step - first step of the re-init epoch: negative before, >= 0 after). On resume,
    records from the resumed epoch on are dropped first, so no epoch appears twice.
    """

    name = "depth-monitor"
    kind = "monitor"

    def __init__(self, out_dir: str | Path, window: int = 5, epochs: Sequence[int] | None = None) -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.path = Path(out_dir) / DEPTH_JSONL
        self.window = int(window)
        self.watch = None if epochs is None else sorted(int(e) for e in epochs)
        self._started = False
        self._dirty = False
        self._epoch = -1
        self._step = -1
        self._pending: list[float | None] | None = None
        self._pending_step = -1
        self._handles: list[Any] = []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: RunContext) -> None:
        self.model = model
        state = dict(model.named_parameters())
        layers = [(n, k) for n, k in tracked_layers(model) if n in state]
        self.names = [n for n, _ in layers]
        self.params = [state[n] for n in self.names]
        pre = ctx.pretrained_state or {}
        # ctx.pretrained_state is the trainer's read-only copy of the weights before training: no 2nd copy
        self.ref = [pre[n].detach() if n in pre else p.detach().clone() for n, p in zip(self.names, self.params)]
        self.ref_norm = [float(torch.linalg.vector_norm(r.double())) for r in self.ref]
        self.spe = max(1, ctx.steps_per_epoch)
        self.total_steps = ctx.epochs * self.spe
        self.watch_epochs = self.watch if self.watch is not None else monitor_epochs(ctx.config, ctx.epochs)
        self.windows: dict[int, int] = {}  # global step -> re-init epoch it belongs to
        for e in self.watch_epochs:
            for s in range(e * self.spe - self.window, e * self.spe + self.window):
                if 0 <= s < self.total_steps:
                    self.windows.setdefault(s, e)
        self.header = {"type": "layers", "names": self.names, "kinds": [k for _, k in layers],
                       "numel": [int(p.numel()) for p in self.params],
                       "head": [in_head(n, ctx.head_names) for n in self.names],
                       "watch_epochs": self.watch_epochs, "window": self.window, "steps_per_epoch": self.spe,
                       "method": ctx.config.get("method"), "reinits": ctx.config.get("reinits")}
        for h in self._handles:
            h.remove()
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_hook(i)) for i, p in enumerate(self.params)]
        self._handles.append(model.register_forward_pre_hook(self._eval_hook))

    # ---- hooks
    def _grad_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if self._pending is not None and p.grad is not None:
                self._pending[i] = float(torch.linalg.vector_norm(p.grad.detach().double()))
        return hook

    def _eval_hook(self, module: nn.Module, args: tuple) -> None:
        if not module.training and self._dirty:
            self._flush_grads()
            self._write({"type": "weights", "epoch": self._epoch, "rel_change": self.rel_change()})
            self._dirty = False

    def rel_change(self) -> list[float]:
        out = []
        with torch.no_grad():
            for p, r, rn in zip(self.params, self.ref, self.ref_norm):
                num = float(torch.linalg.vector_norm((p.detach() - r.to(p.device)).double()))
                out.append(num / rn if rn > 0 else (0.0 if num == 0 else math.inf))
        return out

    # ---- protocol
    def on_epoch_start(self, epoch: int) -> dict[str, Any]:
        if not self._started:
            self._start(epoch)
        self._flush_grads()
        self._epoch = epoch
        return {}

    def on_step_start(self, step: int) -> None:
        self._flush_grads()
        self._dirty = True
        self._step = step
        if step in self.windows:
            self._pending = [None] * len(self.params)
            self._pending_step = step
        else:
            self._pending = None

    # ---- output
    def _start(self, epoch: int) -> None:
        """First epoch of this process: keep records of earlier epochs (resume), write the header."""
        self._started = True
        kept = []
        if epoch > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("type") != "layers" and rec.get("epoch", 0) < epoch:
                        kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from ..train.checkpoint import atomic_write_text
        atomic_write_text(self.path, "".join(x + "\n" for x in [json.dumps(self.header), *kept]))

    def _flush_grads(self) -> None:
        if self._pending is None:
            return
        s, e = self._pending_step, self.windows[self._pending_step]
        self._write({"type": "grad", "epoch": s // self.spe, "step": s, "reinit_epoch": e,
                     "offset": s - e * self.spe, "norms": self._pending})
        self._pending = None

    def _write(self, rec: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self._flush_grads()
        for h in self._handles:
            h.remove()
        self._handles = []
