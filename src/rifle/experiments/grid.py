"""Grid files for ``rifle bench``: datasets x models x train fractions x methods x seeds, parsed, checked
and expanded into fully resolved runs (seed-major, so a partial grid already holds complete paired
comparisons). The file format and the run folders: docs/experiments.md, "The grid file"; ``${VAR}`` in
dataset entries and ``train:`` values, per-dataset settings and published numbers (``reference:``):
the same page, "Dataset entries, environment variables" and "Reference rows".
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
    "reference",
)
AXIS_KEYS = ("data", "model", "seed", "train_fraction", "out")  # set by the grid, per run
_CONFIG_KEYS = {f.name for f in fields(TrainConfig)}
# Settings only --method rifle reads (its options): in a grid they apply to RIFLE rows only; other rows
# get their defaults, so their config.yaml never records them. `reinits` stays with --record-depth: the
# depth monitor of a non-RIFLE run records the epochs where RIFLE with that K would re-initialise.
_DEFAULTS = TrainConfig()
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
_SPEC = re.compile(r"^([a-z][a-z0-9_]*):(?!//)(.+)$")  # NAME:ROOT (a published dataset, rifle.data)
_VAR = re.compile(r"\$\{([^}]*)\}")


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
    datasets: tuple[str, ...] | None = None  # None: every dataset of the grid (by dataset name)


@dataclass(frozen=True)
class DatasetEntry:
    """One ``datasets:`` entry: ``data`` (a ``--data`` value, ``${VAR}`` not yet expanded), ``name`` (the
    run folder and the report's cell; default: ``data``) and TrainConfig ``values`` for its runs only."""

    index: int
    name: str
    data: str
    values: dict[str, Any] = field(default_factory=dict)
    explicit_name: bool = False

    @property
    def key(self) -> str:
        """What ``reference:`` rows and a method's ``datasets:`` call it: the explicit ``name``, else the
        ``NAME`` of a ``NAME:ROOT`` value, else the value itself."""
        if self.explicit_name:
            return self.name
        m = _SPEC.match(self.data)
        return m.group(1) if m else self.data


@dataclass(frozen=True)
class RefSource:
    """A publication or repository whose numbers a grid shows beside its own (``reference: sources:``)."""

    id: str
    citation: str
    recipe: dict[str, Any]
    url: str | None = None


@dataclass(frozen=True)
class RefRow:
    """One published number (``reference: rows:``): top-1 test accuracy in %, never in our statistics."""

    index: int
    source: str
    dataset: str  # a dataset key of the grid
    method: str  # as the source names it
    accuracy: float
    pm: float | None = None  # the published +-, when there is one
    compare_with: str | None = None  # a method label of the grid
    train_fraction: float = 1.0  # default: the grid's only fraction, else 1.0
    as_published: str | None = None  # the dataset's name in the source
    runs: int | None = None
    note: str | None = None


@dataclass
class Reference:
    sources: dict[str, RefSource]
    rows: list[RefRow]


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
    dataset_entries: list[DatasetEntry] = field(default_factory=list)  # datasets[i]: the entry's name
    reference: Reference | None = None

    def entry(self, label: str) -> MethodEntry:
        return next(e for e in self.methods if e.label == label)

    def entries(self) -> list[DatasetEntry]:
        """The dataset entries (plain strings too, for a Grid built by hand)."""
        return self.dataset_entries or [DatasetEntry(i, d, d) for i, d in enumerate(self.datasets)]


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
            c.train_per_class,
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


def expand_vars(text: str, where: str) -> str:
    """``text`` with every ``${VAR}`` replaced by the environment variable's value; an unset (or empty)
    variable is an error naming it and ``where``. ``$VAR`` without braces is left as it is."""
    import os

    def sub(m: re.Match) -> str:
        var = m.group(1)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            raise GridError(f"{where}: {m.group(0)!r} is not a valid environment variable reference")
        value = os.environ.get(var)
        if not value:
            raise GridError(
                f"{where}: environment variable {var} is not set (the grid file reads it as "
                f"${{{var}}}); e.g. export {var}=/path/to/the/folder (docs/reproduce.md)"
            )
        return value

    return _VAR.sub(sub, text)


def _expand_values(values: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        k: expand_vars(v, f"{where}: {k}") if isinstance(v, str) and "${" in v else v
        for k, v in values.items()
    }


def _check_values(d: dict[str, Any], where: str) -> None:
    for k in d:
        if k in AXIS_KEYS:
            raise GridError(f"{where}: {k!r} is set by the grid, not here")
        if k not in _CONFIG_KEYS:
            raise GridError(f"{where}: unknown key {k!r}{_hint(k, _CONFIG_KEYS)}")


def _dataset_entries(raw: list, where: str) -> list[DatasetEntry]:
    """``datasets:``: each a ``--data`` value, or ``{data: ..., name: ..., <TrainConfig key>: ...}``."""
    out = []
    for i, item in enumerate(raw):
        at = f"{where}: datasets[{i}]"
        if not isinstance(item, dict):
            out.append(DatasetEntry(i, str(item), str(item)))
            continue
        d = _norm_keys(item, at)
        data, name = d.pop("data", None), d.pop("name", None)
        if not isinstance(data, str) or not data.strip():
            raise GridError(f"{at}: needs data: (a --data value, e.g. cub200:${{RIFLE_DATA}}/CUB_200_2011)")
        if name is not None and (not isinstance(name, str) or safe_name(name) != name):
            raise GridError(
                f"{at}: name {name!r} must use only letters, digits and ._+=- (it names a folder)"
                + (f"; e.g. {safe_name(name)!r}" if isinstance(name, str) else "")
            )
        _check_values(d, f"{at} ({name or data})")
        if isinstance(d.get("trick"), str):
            d["trick"] = [t for t in d["trick"].split(",") if t]
        out.append(DatasetEntry(i, name or data, data, d, name is not None))
    return out


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


REF_SOURCE_KEYS = ("citation", "url", "recipe")
REF_ROW_KEYS = (
    "source",
    "dataset",
    "method",
    "accuracy",
    "pm",
    "compare_with",
    "train_fraction",
    "as_published",
    "runs",
    "note",
)


def parse_reference(
    raw: Any, datasets: list[str], labels: list[str], fractions: list[float], where: str = "grid"
) -> Reference:
    """Check a ``reference:`` block: published numbers shown beside ours by ``rifle report``, never mixed
    into our statistics. ``datasets``: the grid's dataset keys; ``labels``: its method labels."""
    at = f"{where}: reference"
    if not isinstance(raw, dict) or set(raw) - {"sources", "rows"}:
        raise GridError(
            f"{at}: expected a mapping with sources: and rows: (docs/experiments.md, Reference rows)"
        )
    raw_sources = raw.get("sources")
    if not isinstance(raw_sources, dict) or not raw_sources:
        raise GridError(f"{at}: sources: expected a non-empty mapping of id -> {{citation, url, recipe}}")
    sources: dict[str, RefSource] = {}
    for sid, spec in raw_sources.items():
        sat = f"{at}: sources: {sid}"
        if not isinstance(spec, dict):
            raise GridError(f"{sat}: expected a mapping with citation:, recipe: and url:")
        unknown = [k for k in spec if k not in REF_SOURCE_KEYS]
        if unknown:
            raise GridError(f"{sat}: unknown key {unknown[0]!r}{_hint(str(unknown[0]), REF_SOURCE_KEYS)}")
        citation, url, recipe = spec.get("citation"), spec.get("url"), spec.get("recipe")
        if not isinstance(citation, str) or not citation.strip():
            raise GridError(f"{sat}: citation: is required (authors, title, year or repository)")
        if url is not None and not isinstance(url, str):
            raise GridError(f"{sat}: url: must be text")
        if not isinstance(recipe, dict) or not recipe:
            raise GridError(
                f"{sat}: recipe: is required, a mapping such as {{backbone: ResNet-50, resolution: 224, "
                f"epochs: 40, selection: last epoch}}: recipes differ by more than the gains compared"
            )
        bad = [k for k, v in recipe.items() if isinstance(v, (dict, list))]
        if bad:
            raise GridError(f"{sat}: recipe: {bad[0]!r} must be a single value (text or number)")
        sources[str(sid)] = RefSource(str(sid), citation.strip(), {str(k): v for k, v in recipe.items()}, url)
    raw_rows = raw.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise GridError(f"{at}: rows: expected a non-empty list of published numbers")
    rows: list[RefRow] = []
    for i, r in enumerate(raw_rows):
        if not isinstance(r, dict):
            raise GridError(f"{at}: rows[{i}]: expected a mapping, got {r!r}")
        r = {str(k).replace("-", "_"): v for k, v in r.items()}
        rat = f"{at}: rows[{i}] ({r.get('source')}, {r.get('dataset')}, {r.get('method')})"
        unknown = [k for k in r if k not in REF_ROW_KEYS]
        if unknown:
            raise GridError(f"{rat}: unknown key {unknown[0]!r}{_hint(unknown[0], REF_ROW_KEYS)}")
        for k in ("source", "dataset", "method", "accuracy"):
            if r.get(k) is None:
                raise GridError(f"{rat}: {k}: is required")
        if str(r["source"]) not in sources:
            raise GridError(f"{rat}: source {r['source']!r} is not in sources: ({', '.join(sources)})")
        if str(r["dataset"]) not in datasets:
            raise GridError(
                f"{rat}: dataset {r['dataset']!r} is not a dataset of this grid"
                f"{_hint(str(r['dataset']), datasets)}; datasets: {', '.join(datasets)}"
            )
        acc = _number(r["accuracy"])
        if acc is None or not 0 <= acc <= 100:
            raise GridError(f"{rat}: accuracy {r['accuracy']!r} must be a top-1 accuracy in % (0-100)")
        pm = None if r.get("pm") is None else _number(r["pm"])
        if r.get("pm") is not None and (pm is None or pm < 0):
            raise GridError(f"{rat}: pm {r['pm']!r} must be a number >= 0 (the published +-, in points)")
        cw = r.get("compare_with")
        if cw is not None and str(cw) not in labels:
            raise GridError(
                f"{rat}: compare_with {cw!r} is not a method label of this grid{_hint(str(cw), labels)}; "
                f"labels: {', '.join(labels)}"
            )
        raw_frac = r.get("train_fraction", fractions[0] if len(fractions) == 1 else 1.0)
        frac = _number(raw_frac)
        if frac is None or frac not in fractions:
            raise GridError(
                f"{rat}: train_fraction {raw_frac!r} is not one of the grid's train_fractions {fractions}"
            )
        runs = r.get("runs")
        if runs is not None and (isinstance(runs, bool) or not isinstance(runs, int) or runs < 1):
            raise GridError(
                f"{rat}: runs {runs!r} must be an integer >= 1 (how many runs the number is over)"
            )
        for k in ("method", "as_published", "note"):
            if r.get(k) is not None and not isinstance(r[k], (str, int, float)):
                raise GridError(f"{rat}: {k}: must be text")
        rows.append(
            RefRow(
                index=i,
                source=str(r["source"]),
                dataset=str(r["dataset"]),
                method=str(r["method"]),
                accuracy=acc,
                pm=pm,
                compare_with=None if cw is None else str(cw),
                train_fraction=frac,
                as_published=None if r.get("as_published") is None else str(r["as_published"]),
                runs=runs,
                note=None if r.get("note") is None else str(r["note"]),
            )
        )
    return Reference(sources, rows)


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
    i: int, raw: Any, grid_fractions: list[float], grid_datasets: list[str] | None = None
) -> tuple[dict[str, Any], str | None, tuple[float, ...] | None, tuple[str, ...] | None]:
    where = f"methods[{i}]"
    d = _norm_keys(raw if not isinstance(raw, str) else {"name": raw}, where)
    label = d.pop("label", None)
    fracs = d.pop("train_fractions", None)
    sets = d.pop("datasets", None)
    if sets is not None:
        sets = tuple(str(x) for x in (sets if isinstance(sets, (list, tuple)) else [sets]))
        known = grid_datasets or []
        if not sets or not set(sets) <= set(known):
            raise GridError(
                f"{where} ({label or d.get('name')}): datasets {list(sets)} must be a non-empty subset of "
                f"the grid's dataset names {known}"
            )
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
    return {"method": str(name), **d}, (None if label is None else str(label)), fracs, sets


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
    dataset_entries = _dataset_entries(_as_list(spec.get("datasets"), "datasets"), where)
    datasets = [e.name for e in dataset_entries]
    keys = [e.key for e in dataset_entries]
    if len(set(keys)) != len(keys):
        raise GridError(f"{where}: datasets {datasets} have the same name twice ({keys}); give each a name:")
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
        values, label, entry_fracs, entry_sets = _method_values(i, raw, fracs, keys)
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
                i,
                values,
                label if label is not None else default_label(values, cfg),
                explicit,
                entry_fracs,
                entry_sets,
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
    reference = None
    if spec.get("reference") is not None:
        reference = parse_reference(spec["reference"], keys, list(seen), fracs, where)
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
        dataset_entries=dataset_entries,
        reference=reference,
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


def only_seeds(grid: Grid, seeds: str) -> Grid:
    """The grid restricted to ``seeds`` (``rifle bench --seeds 0,1``), each one of the grid's own."""
    import dataclasses

    try:
        want = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise GridError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0 or 0,1") from None
    if not want:
        raise GridError(f"--seeds {seeds!r}: names no seed")
    unknown = [s for s in want if s not in grid.seeds]
    if unknown:
        raise GridError(
            f"--seeds {seeds}: seed(s) {unknown} are not in grid {grid.source or ''} "
            f"(its seeds: {grid.seeds})"
        )
    return dataclasses.replace(grid, seeds=[s for s in grid.seeds if s in want])


def run_path(out: str | Path, dataset: str, model: str, fraction: float, label: str, seed: int) -> Path:
    return (
        Path(out)
        / safe_name(Path(dataset).name)
        / safe_name(model)
        / f"frac{fraction:g}"
        / label
        / f"seed{seed}"
    )


def expand(grid: Grid, out: str | Path, check_data: bool = True) -> list[RunSpec]:
    """Every run of the grid, resolved and validated, seed-major (see module docstring). ``${VAR}`` in
    dataset entries and ``train:`` values is expanded here (an unset variable is an error naming it).
    ``check_data=False`` skips :func:`check_names`' existence checks (for listing a grid whose data is
    elsewhere)."""
    from ..core.schedule import make_schedule
    from ..build import build_methods

    if check_data:
        check_names(grid)
    where_grid = f"grid {grid.source}" if grid.source else "grid"
    train = _expand_values(grid.train, f"{where_grid}: train")
    entries = grid.entries()
    resolved = [
        (
            e,
            expand_vars(e.data, f"{where_grid}: datasets[{e.index}]"),
            _expand_values(e.values, f"{where_grid}: datasets[{e.index}]"),
        )
        for e in entries
    ]
    runs = []
    for seed in grid.seeds:
        for d, data, dvalues in resolved:
            dataset = d.name
            for frac in grid.train_fractions:
                for model in grid.models:
                    for e in grid.methods:
                        if e.train_fractions is not None and frac not in e.train_fractions:
                            continue
                        if e.datasets is not None and d.key not in e.datasets:
                            continue
                        path = run_path(out, dataset, model, frac, e.label, seed)
                        where = f"methods[{e.index}] ({e.label}) on {dataset}/{model}/frac{frac:g}/seed{seed}"
                        extra = {
                            **dict(train.get("extra") or {}),
                            "grid": {
                                "label": e.label,
                                "dataset": dataset,
                                "model": model,
                                "train_fraction": frac,
                                "seed": seed,
                            },
                        }
                        values = {
                            **dvalues,
                            **_expand_values(e.values, where),
                            "data": data,
                            "model": model,
                            "seed": seed,
                            "train_fraction": frac,
                            "out": str(path),
                            "extra": extra,
                        }
                        try:
                            cfg = resolve_row(train, values)
                            build_methods(cfg)  # unknown method / reg / trick / option names
                            if cfg.method == "rifle" and cfg.reinit_granularity == "epoch":
                                make_schedule(cfg.epochs, cfg.reinits, cfg.guard, warn=False)
                        except (ValueError, TypeError) as err:
                            raise GridError(f"{where}: {err}") from None
                        runs.append(RunSpec(seed, dataset, frac, model, e.label, cfg, path))
    return runs


def check_names(grid: Grid) -> None:
    """Every dataset (built-in name, ``NAME:ROOT`` of a published dataset, or existing folder) and model
    name of the grid exists: a typo is reported before any run starts, naming the grid entry."""
    from ..data import DataError, _builtin_name, _unknown as unknown_data
    from ..data.published import find_root, parse_spec
    from ..models import BUILTIN_MODELS, TORCHVISION_PREFIX, _unknown as unknown_model
    from ..models.hub import _is_timm_name, _torchvision_names

    where = f"grid {grid.source}" if grid.source else "grid"
    for e in grid.entries():
        d = expand_vars(e.data, f"{where}: datasets[{e.index}]")
        try:
            spec = parse_spec(d) if not _builtin_name(d) else None
            if spec is not None:
                find_root(spec.reader, spec.root)  # the dataset's folder, found now, not after the runs start
                continue
        except DataError as err:
            raise GridError(f"grid: datasets[{e.index}]: {err}") from None
        if _builtin_name(d) or (d and Path(d).expanduser().exists()):
            continue
        raise GridError(f"grid: datasets[{e.index}]: {unknown_data(d)}")
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
