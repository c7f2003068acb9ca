"""Grid files for ``rifle bench``: datasets x models x train fractions x methods x seeds, parsed, checked
and expanded into fully resolved runs (seed-major, so a partial grid already holds complete paired
comparisons). The file format and the run folders: docs/experiments.md, "The grid file".
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import RIFLE_ONLY_KEYS, ConfigError, TrainConfig, resolve, rifle_only_keys

GRID_FILE = "grid.yaml"
GRID_KEYS = (
    "datasets",
    "models",
    "methods",
    "seeds",
    "train_fractions",
    "train",
    "baseline",
    "name",
    "description",
)
AXIS_KEYS = ("data", "model", "seed", "train_fraction", "out")  # set by the grid, per run
_CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
# Settings only --method rifle reads (its options): in a grid they apply to RIFLE rows only; other rows
# get their defaults, so their config.yaml never records them. `reinits` stays with --record-depth: the
# depth monitor of a non-RIFLE run records the epochs where RIFLE with that K would re-initialise.
_DEFAULTS = TrainConfig()
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


class GridError(ConfigError):
    """A grid file that cannot be run; the message names the entry and the key."""


@dataclass(frozen=True)
class MethodEntry:
    """One ``methods:`` entry: TrainConfig values (``method`` = the entry's ``name``) and a label."""

    index: int
    values: dict[str, Any]
    label: str
    explicit_label: bool = False
    train_fractions: tuple[float, ...] | None = None  # None: every fraction of the grid


@dataclass
class Grid:
    datasets: list[str]
    models: list[str]
    methods: list[MethodEntry]
    seeds: list[int]
    train_fractions: list[float]
    train: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    name: str | None = None
    source: str | None = None  # the file it came from
    text: str | None = None  # its text (copied to OUT/grid.yaml)
    spec: dict[str, Any] = field(default_factory=dict)  # the mapping it was parsed from

    def entry(self, label: str) -> MethodEntry:
        return next(e for e in self.methods if e.label == label)


@dataclass
class RunSpec:
    """One run of a grid, fully resolved."""

    seed: int
    dataset: str
    fraction: float
    model: str
    label: str
    cfg: TrainConfig
    path: Path

    @property
    def rel(self) -> str:
        return "/".join(self.path.parts[-5:])

    def data_key(self) -> tuple:
        c = self.cfg
        return (
            c.data,
            c.image_size,
            c.seed,
            c.val_fraction,
            c.train_fraction,
            c.skip_bad_images,
            c.label_noise,
        )


def safe_name(text: str) -> str:
    """A folder-safe version of ``text`` (letters, digits, ``._+=-``; anything else -> ``_``)."""
    out = _SAFE.sub("_", str(text)).strip("_.")
    return out or "_"


def _hint(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _as_list(value: Any, key: str) -> list:
    if value is None:
        raise GridError(f"grid: {key!r} is required")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise GridError(f"grid: {key!r} is empty")
    if len(set(map(repr, items))) != len(items):
        raise GridError(f"grid: {key!r} lists a value twice: {items}")
    return items


def _norm_keys(d: dict, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise GridError(f"{where}: expected a mapping, got {type(d).__name__} {d!r}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def default_label(values: dict[str, Any], cfg: TrainConfig) -> str:
    """``rifle-K2``, ``finetune+delta+dropout``, ``rifle-K1+keep-optimizer-state``, ``l2sp.alpha=0.1``.

    The method (with K for RIFLE), then the regulariser when not ``l2``, the tricks, then every other
    key the entry sets (``key`` for true, ``no-key`` for false, ``key=value`` otherwise) and options.
    """
    parts = [f"rifle-K{cfg.reinits}" if cfg.method == "rifle" else cfg.method]
    if cfg.reg != "l2":
        parts.append(cfg.reg)
    parts += list(cfg.trick)
    for k in sorted(values):
        if k in ("method", "reg", "trick", "options", "label") or (k == "reinits" and cfg.method == "rifle"):
            continue
        v, name = values[k], k.replace("_", "-")
        parts.append(name if v is True else f"no-{name}" if v is False else f"{name}={_fmt(v)}")
    for m, opts in sorted((values.get("options") or {}).items()):
        for k, v in sorted(opts.items()):
            parts.append(f"{m}.{k}={_fmt(v)}")
    return safe_name("+".join(parts))


def resolve_row(train: dict[str, Any], values: dict[str, Any]) -> TrainConfig:
    """The config of one row: ``train:`` overridden by the entry; RIFLE's settings for RIFLE rows only."""
    merged = {**train, **values}
    method = str(merged.get("method", _DEFAULTS.method))
    drop = rifle_only_keys(method, bool(merged.get("record_depth")))
    cfg = resolve({k: v for k, v in merged.items() if k not in drop})
    if drop:  # a preset's RIFLE settings too: the row records the defaults
        from dataclasses import replace

        cfg = replace(cfg, **{k: getattr(_DEFAULTS, k) for k in rifle_only_keys(method, cfg.record_depth)})
    return cfg


def _method_values(
    i: int, raw: Any, grid_fractions: list[float]
) -> tuple[dict[str, Any], str | None, tuple[float, ...] | None]:
    where = f"methods[{i}]"
    d = _norm_keys(raw if not isinstance(raw, str) else {"name": raw}, where)
    label = d.pop("label", None)
    fracs = d.pop("train_fractions", None)
    if fracs is not None:
        try:
            fracs = tuple(float(f) for f in (fracs if isinstance(fracs, (list, tuple)) else [fracs]))
        except (TypeError, ValueError):
            raise GridError(f"{where} ({label or d.get('name')}): train_fractions must be numbers") from None
        if not fracs or not set(fracs) <= set(grid_fractions):
            raise GridError(
                f"{where} ({label or d.get('name')}): train_fractions {list(fracs)} must be a "
                f"non-empty subset of the grid's train_fractions {grid_fractions}"
            )
    if "name" in d and "method" in d:
        raise GridError(f"{where}: give the method once (name: or method:), not both")
    name = d.pop("name", d.pop("method", None))
    if not name:
        raise GridError(f"{where} {raw!r}: needs name: (finetune, rifle, ...)")
    where = f"methods[{i}] ({label or name})"
    for k in d:
        if k in AXIS_KEYS:
            raise GridError(
                f"{where}: {k!r} is set by the grid (datasets/models/seeds/train_fractions/"
                f"--out), not by a method entry"
            )
        if k not in _CONFIG_KEYS:
            raise GridError(f"{where}: unknown key {k!r}{_hint(k, _CONFIG_KEYS | {'name', 'label'})}")
    if isinstance(d.get("trick"), str):
        d["trick"] = [t for t in d["trick"].split(",") if t]
    rifle_only = [k for k in d if k in rifle_only_keys(str(name), bool(d.get("record_depth")))]
    if rifle_only:
        raise GridError(
            f"{where}: {', '.join(rifle_only)} appl{'ies' if len(rifle_only) == 1 else 'y'} to "
            f"name: rifle only; a {name} entry would ignore {'it' if len(rifle_only) == 1 else 'them'}"
            f" (set RIFLE's settings in train: for every RIFLE row, or in a rifle entry)"
        )
    return {"method": str(name), **d}, (None if label is None else str(label)), fracs


def parse_grid(spec: dict[str, Any], source: str | None = None, text: str | None = None) -> Grid:
    """Check a grid mapping (keys, types, labels); :func:`expand` resolves every run."""
    where = f"grid {source}" if source else "grid"
    spec = _norm_keys(spec, where)
    for k in spec:
        if k not in GRID_KEYS:
            raise GridError(f"{where}: unknown key {k!r}{_hint(k, GRID_KEYS)}; keys: {', '.join(GRID_KEYS)}")
    train = _norm_keys(spec.get("train") or {}, f"{where}: train")
    for k in train:
        if k in AXIS_KEYS:
            raise GridError(f"{where}: train: {k!r} is set by the grid, not in train:")
        if k not in _CONFIG_KEYS:
            raise GridError(f"{where}: train: unknown key {k!r}{_hint(k, _CONFIG_KEYS)}")
    datasets = [str(d) for d in _as_list(spec.get("datasets"), "datasets")]
    models = [str(m) for m in _as_list(spec.get("models"), "models")]
    seeds = _as_list(spec.get("seeds"), "seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise GridError(f"{where}: seeds must be integers, got {seeds}")
    fracs = _as_list(spec.get("train_fractions", [1.0]), "train_fractions")
    try:
        fracs = [float(f) for f in fracs]
    except (TypeError, ValueError):
        raise GridError(f"{where}: train_fractions must be numbers in (0, 1], got {fracs}") from None
    if not all(0 < f <= 1 for f in fracs):
        raise GridError(f"{where}: train_fractions must be in (0, 1], got {fracs}")
    raw_methods = spec.get("methods")
    if not isinstance(raw_methods, list) or not raw_methods:
        raise GridError(
            f"{where}: methods: expected a non-empty list of entries like {{name: rifle, reinits: 2}}"
        )
    entries = []
    for i, raw in enumerate(raw_methods):
        values, label, entry_fracs = _method_values(i, raw, fracs)
        try:
            cfg = resolve_row(train, values)
        except (ConfigError, TypeError) as err:
            raise GridError(f"methods[{i}] ({label or values['method']}): {err}") from None
        explicit = label is not None
        if label is not None and safe_name(label) != label:
            raise GridError(
                f"methods[{i}]: label {label!r} must use only letters, digits and ._+=- "
                f"(it names a folder); e.g. {safe_name(label)!r}"
            )
        entries.append(
            MethodEntry(
                i, values, label if label is not None else default_label(values, cfg), explicit, entry_fracs
            )
        )
    seen: dict[str, int] = {}
    for e in entries:
        if e.label in seen:
            raise GridError(
                f"methods[{seen[e.label]}] and methods[{e.index}] both have the label "
                f"{e.label!r}; give one an explicit label:"
            )
        seen[e.label] = e.index
    for kind, names in (("datasets", datasets), ("models", models)):
        folders = [safe_name(Path(n).name if kind == "datasets" else n) for n in names]
        if len(set(folders)) != len(folders):
            raise GridError(f"{where}: {kind} {names} map to clashing folder names {folders}")
    baseline = spec.get("baseline")
    if baseline is None:
        baseline = next((e.label for e in entries if e.label == "finetune"), None)
    elif str(baseline) not in seen:
        raise GridError(f"{where}: baseline {baseline!r} is not a method label; labels: {', '.join(seen)}")
    return Grid(
        datasets=datasets,
        models=models,
        methods=entries,
        seeds=[int(s) for s in seeds],
        train_fractions=fracs,
        train=train,
        baseline=None if baseline is None else str(baseline),
        name=spec.get("name"),
        source=source,
        text=text,
        spec=spec,
    )


def load_grid(path: str | Path) -> Grid:
    p = Path(path)
    if not p.is_file():
        raise GridError(f"grid file {p}: no such file")
    text = p.read_text()
    try:
        spec = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise GridError(f"grid file {p}: not valid YAML: {e}") from None
    return parse_grid(spec, source=str(p), text=text)


def run_path(out: str | Path, dataset: str, model: str, fraction: float, label: str, seed: int) -> Path:
    return (
        Path(out)
        / safe_name(Path(dataset).name)
        / safe_name(model)
        / f"frac{fraction:g}"
        / label
        / f"seed{seed}"
    )


def expand(grid: Grid, out: str | Path) -> list[RunSpec]:
    """Every run of the grid, resolved and validated, seed-major (see module docstring)."""
    from ..core.schedule import make_schedule
    from ..build import build_methods

    check_names(grid)
    runs = []
    for seed in grid.seeds:
        for dataset in grid.datasets:
            for frac in grid.train_fractions:
                for model in grid.models:
                    for e in grid.methods:
                        if e.train_fractions is not None and frac not in e.train_fractions:
                            continue
                        path = run_path(out, dataset, model, frac, e.label, seed)
                        where = f"methods[{e.index}] ({e.label}) on {dataset}/{model}/frac{frac:g}/seed{seed}"
                        extra = {
                            **dict(grid.train.get("extra") or {}),
                            "grid": {
                                "label": e.label,
                                "dataset": dataset,
                                "model": model,
                                "train_fraction": frac,
                                "seed": seed,
                            },
                        }
                        values = {
                            **e.values,
                            "data": dataset,
                            "model": model,
                            "seed": seed,
                            "train_fraction": frac,
                            "out": str(path),
                            "extra": extra,
                        }
                        try:
                            cfg = resolve_row(grid.train, values)
                            build_methods(cfg)  # unknown method / reg / trick / option names
                            if cfg.method == "rifle" and cfg.reinit_granularity == "epoch":
                                make_schedule(cfg.epochs, cfg.reinits, cfg.guard, warn=False)
                        except (ValueError, TypeError) as err:
                            raise GridError(f"{where}: {err}") from None
                        runs.append(RunSpec(seed, dataset, frac, model, e.label, cfg, path))
    return runs


def check_names(grid: Grid) -> None:
    """Every dataset (built-in name or existing folder) and model name of the grid exists: a typo is
    reported before any run starts, naming the grid entry."""
    from ..data import _builtin_name, _unknown as unknown_data
    from ..models import BUILTIN_MODELS, TORCHVISION_PREFIX, _unknown as unknown_model
    from ..models.hub import _is_timm_name, _torchvision_names

    for i, d in enumerate(grid.datasets):
        if not _builtin_name(d) and not (d and Path(d).expanduser().exists()):
            raise GridError(f"grid: datasets[{i}]: {unknown_data(d)}")
    for i, m in enumerate(grid.models):
        if m in BUILTIN_MODELS:
            continue
        known = (
            m[len(TORCHVISION_PREFIX) :] in _torchvision_names()
            if m.startswith(TORCHVISION_PREFIX)
            else _is_timm_name(m)
        )
        if not known:
            raise GridError(f"grid: models[{i}]: {unknown_model(m)}")


def config_changes(spec: RunSpec) -> dict[str, tuple[Any, Any]]:
    """How the ``config.yaml`` already in ``spec``'s folder differs from the grid's config for it
    (``{key: (recorded, grid)}``; empty when it matches or there is none). Keys that do not change a
    run's numbers (``out``, ``threads``, ...) and, for a method other than RIFLE, RIFLE's settings, are
    not compared."""
    from ..build import build_methods
    from ..config import diff_configs
    from ..train.outputs import CONFIG

    p = spec.path / CONFIG
    if not p.is_file():
        return {}
    try:
        saved = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        return {"config.yaml": ("unreadable", "the grid's config")}
    current = {
        **spec.cfg.to_dict(),
        "resolved_methods": {m.name: m.config() for m in build_methods(spec.cfg)},
    }
    diff = diff_configs(saved, current)
    if saved.get("method") != "rifle" and spec.cfg.method != "rifle":
        diff = {k: v for k, v in diff.items() if k not in RIFLE_ONLY_KEYS}
    return diff


def changed_runs(runs: list[RunSpec]) -> list[tuple[RunSpec, dict[str, tuple[Any, Any]]]]:
    """The runs whose folder holds a config that differs from the grid's (see :func:`config_changes`)."""
    return [(r, d) for r in runs for d in [config_changes(r)] if d]


def changed_error(changed: list[tuple[RunSpec, dict[str, tuple[Any, Any]]]], out: str | Path) -> GridError:
    """The refusal of a grid that no longer matches runs in ``out``, naming the differing keys."""
    from ..config import format_diff

    keys: dict[str, list[str]] = {}
    for _, diff in changed:
        for k, (a, b) in diff.items():
            keys.setdefault(k, [])
            if f"{a!r} -> {b!r}" not in keys[k]:
                keys[k].append(f"{a!r} -> {b!r}")
    listed = ", ".join(f"{k} ({', '.join(v)})" for k, v in keys.items())
    examples = "\n".join(f"  {r.rel}: {format_diff(d)}" for r, d in changed[:3])
    more = f"\n  ... and {len(changed) - 3} more" if len(changed) > 3 else ""
    return GridError(
        f"{len(changed)} run(s) in {out} were trained with a config that differs from this grid's; changed "
        f"keys: {listed}\n{examples}{more}\n"
        f"Their results would be kept and reported beside the new recipe. Restore the grid, use another "
        f"--out, or pass --rerun-changed to train those runs again from scratch (their old results are "
        f"deleted)."
    )


def write_grid_copy(grid: Grid, out: str | Path, log: Any = None) -> Path | None:
    """``OUT/grid.yaml``: the grid text this folder was (last) run with, for ``rifle report``.

    A previous copy with different contents is never silently replaced: it is kept as
    ``OUT/grid.previous-<N>.yaml`` (returned, and said through ``log``)."""
    from ..train.checkpoint import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = grid.text if grid.text is not None else yaml.safe_dump(grid.spec, sort_keys=False)
    header = f"# copied by `rifle bench` from {grid.source}\n" if grid.source else ""
    kept = None
    old = out / GRID_FILE
    if old.is_file():
        try:
            same = _norm_keys(yaml.safe_load(old.read_text()) or {}, str(old)) == _norm_keys(
                grid.spec, "grid"
            )
        except (yaml.YAMLError, GridError):
            same = False
        if not same:
            n = 1
            while (out / f"grid.previous-{n}.yaml").exists():
                n += 1
            kept = out / f"grid.previous-{n}.yaml"
            old.replace(kept)
            if log is not None:
                log(
                    f"{old}: the grid changed since this folder was last run; "
                    f"the previous copy is kept as {kept}"
                )
    atomic_write_text(out / GRID_FILE, header + text)
    return kept
