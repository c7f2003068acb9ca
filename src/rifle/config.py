"""The one configuration object of a run: defaults <- preset <- config file <- flags, validated.

No other module re-reads flags or files. ``TrainConfig`` fields are the config-file keys and (with
``-`` for ``_``) the ``rifle train`` flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml


# --method plug-ins whose options are TrainConfig's top-level keys; every other plug-in takes its options
# from `options:` and flags --<name>-<option>
TOP_LEVEL_OPTIONS = ("rifle",)
# keys only --method rifle reads: with another method they would be ignored, so giving one is refused
# (flags: rifle train; a config file: resolve()). `head` is not one: every method's trainer uses it.
RIFLE_ONLY_KEYS = (
    "reinits",
    "reinit_granularity",
    "guard",
    "guard_steps",
    "min_steps_after",
    "reinit_init",
    "keep_optimizer_state",
    "head_lr_restart",
    "reinit_modules",
    "reinit_trigger",
    "reinit_converged_acc",
    "diagnose",
    "diagnosis_window",
)


class ConfigError(ValueError):
    """A bad setting: the message names the key (flag), the value and, when known, the file."""


def _suggest(value: Any, choices) -> str:
    """`` (did you mean X?)`` for a misspelt or wrongly-cased name; empty when nothing is close."""
    if not isinstance(value, str):
        return ""
    by_lower = {str(c).lower(): str(c) for c in choices}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=3)
    return f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""


@dataclass
class TrainConfig:
    # what to train
    data: str = "elpv"  # builtin name (elpv, digits) or an image-folder path
    model: str = "efficientnet_lite0"  # builtin, timm name, or torchvision:<name>
    pretrained: bool = True
    pretrained_file: str | None = None  # backbone weights from this safetensors / torch file (no hub)
    method: str = "finetune"  # finetune | rifle | lp-ft
    reg: str = "l2"  # regulariser: l2 (weight decay) | l2sp | delta | bss
    trick: list[str] = field(default_factory=list)  # dropout, dropconnect, stochastic-depth, ...
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {method: {option: value}}
    # RIFLE (REFERENCE.md §3)
    reinits: int = 3  # K = number of re-initialisations
    reinit_granularity: str = "epoch"  # epoch | step
    guard: int | None = None  # None = max(1, ceil(E/8))
    guard_steps: int | None = None
    min_steps_after: int = 100
    reinit_init: str = "default"  # default, norm_matched, shrink_perturb[:L,S], ...: docs/rifle.md
    keep_optimizer_state: bool = False  # True = official code (momentum kept)
    head_lr_restart: bool = False  # True = official fc_lr_util=cyclic
    head: str | None = None  # dotted module name(s) of the head; None = automatic
    reinit_modules: str | None = None  # RIFLE beyond the FC layer: "last:N" blocks or a regex
    reinit_trigger: str = "schedule"  # schedule (paper) | converged: docs/rifle.md#trigger
    reinit_converged_acc: float | None = None  # the converged trigger's threshold; None = 0.97
    diagnose: bool = True  # RIFLE: measure each re-init and print a verdict (docs/rifle.md#when)
    diagnosis_window: int = 5  # RIFLE: optimizer steps measured on each side of a re-init
    # the recipe (paper defaults: SGD m 0.9, lr 0.01, wd 1e-4, cosine per epoch, batch 32)
    epochs: int = 40
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # cosine (per epoch) | constant
    opt: str = "sgd"  # sgd (the paper's: torch SGD, classical momentum) | any timm.optim name
    opt_eps: float | None = None  # the optimizer's epsilon; None = its default
    opt_betas: list[float] | None = None  # Adam-type (beta1, beta2); None = the optimizer's default
    layer_decay: float | None = None  # layer-wise LR decay (timm group_matcher layers); None = off
    label_smoothing: float = 0.0  # > 0 adds the label-smoothing trick with this epsilon (docs/methods.md)
    image_size: int = 224
    # data
    seed: int = 0
    val_fraction: float = 0.1
    train_fraction: float = 1.0
    train_per_class: int | None = None  # keep N train images per class (fixed split seed; docs/data.md)
    label_noise: float = 0.0  # share of train/val labels replaced by another class (docs/data.md)
    skip_bad_images: bool = False
    cache_dir: str | None = None  # decode cache; None = $RIFLE_CACHE_DIR or ~/.cache/rifle, "off" = none
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = True  # measured 1.4-1.7x faster on the 2-core CPU
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a GradScaler)
    compile: bool = False  # torch.compile the model
    grad_accum: int = 1  # split each batch into this many micro-batches
    workers: int = 0  # background threads preparing batches (0 = in-process)
    record_depth: bool = False  # record per-layer weight change / gradient norms (depth.jsonl)
    log_to: str = "auto"  # metric writers beside metrics.jsonl: csv, tensorboard (auto: both
    # when tensorboard is installed) or jsonl alone. Not "log": torchrun
    # would take --log as an ambiguous abbreviation of its --log-dir
    log_interval: int = 50  # stderr not a terminal: a progress line every N steps (0 = off)
    eval_batch_size: int = 256
    eval_test: str = "needed"  # needed: test only the last and the best-validation epoch's model | every
    threads: int | None = None  # torch intra-op threads; None = torch's default
    out: str = "runs/train"
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes recorded with the run
    # the keys the user gave (config file, flags, a grid's entry), set by resolve(); None = not known.
    # Not a setting: never recorded. Lets a plug-in speak only of what was asked (l2sp's weight decay)
    given: ClassVar[frozenset[str] | None] = None

    def validate(self) -> TrainConfig:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"--{key.replace('_', '-')}={getattr(self, key)!r}: {msg}")

        positive = ("epochs", "batch_size", "image_size", "eval_batch_size")
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", "must be in [0, 1)")
        if not 0 < self.train_fraction <= 1:
            raise bad("train_fraction", "must be in (0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", "must be in [0, 1)")
        if self.train_per_class is not None and (
            isinstance(self.train_per_class, bool)
            or not isinstance(self.train_per_class, int)
            or self.train_per_class < 1
        ):
            raise bad("train_per_class", "must be a positive integer (training images kept per class)")
        for key in ("label_noise", "label_smoothing"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise bad(key, "must be a number in [0, 1)")
        if self.label_smoothing and (
            "label-smoothing" in self.trick
            or (isinstance(self.options, dict) and "label-smoothing" in self.options)
        ):
            raise bad(
                "label_smoothing",
                "also --trick label-smoothing or --label-smoothing-eps was given: use one "
                "(--label-smoothing EPS alone adds the trick)",
            )
        if self.reinits < 0:
            raise bad("reinits", "K is the number of re-initialisations and must be >= 0")
        if self.reinits == 0 and self.method == "rifle":
            raise bad(
                "reinits",
                "RIFLE with no re-initialisation is plain fine-tuning (with an empty "
                "diagnosis): use --method finetune, or K >= 1",
            )
        if self.reinit_granularity not in ("epoch", "step"):
            raise bad(
                "reinit_granularity",
                "choose epoch or step" + _suggest(self.reinit_granularity, ("epoch", "step")),
            )
        if self.reinit_trigger not in ("schedule", "converged"):
            raise bad(
                "reinit_trigger",
                "choose schedule (the paper's fixed points) or converged"
                + _suggest(self.reinit_trigger, ("schedule", "converged")),
            )
        self._validate_reinit_init(bad)
        if self.reinit_converged_acc is not None:
            if self.reinit_trigger != "converged":
                raise bad("reinit_converged_acc", "applies only with --reinit-trigger converged")
            if not 0 < self.reinit_converged_acc <= 1:
                raise bad("reinit_converged_acc", "a training accuracy in (0, 1]")
        if (
            not isinstance(self.diagnosis_window, int)
            or isinstance(self.diagnosis_window, bool)
            or self.diagnosis_window < 1
        ):
            raise bad("diagnosis_window", "a positive number of optimizer steps")
        if (
            self.reinit_trigger == "converged"
            and self.method == "rifle"
            and self.reinit_granularity != "epoch"
        ):
            raise bad("reinit_trigger", "converged decides once per epoch: use --reinit-granularity epoch")
        if self.amp not in ("none", "bf16", "fp16"):
            raise bad("amp", "choose none, bf16 or fp16" + _suggest(self.amp, ("none", "bf16", "fp16")))
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise bad("grad_accum", "must be a positive integer")
        if self.batch_size % self.grad_accum:
            raise bad("grad_accum", f"must divide --batch-size {self.batch_size}")
        if (
            not isinstance(self.log_interval, int)
            or isinstance(self.log_interval, bool)
            or self.log_interval < 0
        ):
            raise bad("log_interval", "a number of optimizer steps >= 0 (0 = no step lines)")
        from .train.loggers import parse_kinds  # lazy, stdlib-only: config stays a leaf

        try:
            parse_kinds(self.log_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.eval_test not in ("needed", "every"):
            raise bad("eval_test", "choose needed or every" + _suggest(self.eval_test, ("needed", "every")))
        if self.lr_schedule not in ("cosine", "constant"):
            raise bad(
                "lr_schedule",
                "choose cosine or constant" + _suggest(self.lr_schedule, ("cosine", "constant")),
            )
        self._validate_optimizer(bad)
        if self.pretrained_file is not None:
            if not isinstance(self.pretrained_file, str) or not self.pretrained_file.strip():
                raise bad("pretrained_file", "a path to a safetensors or torch state-dict file")
            if not self.pretrained:
                raise bad("pretrained_file", "contradicts --no-pretrained (pretrained: false): drop one")
        if self.image_size < 16:
            raise bad("image_size", "must be >= 16")
        if isinstance(self.trick, str):
            self.trick = [t for t in self.trick.split(",") if t]
        if len(set(self.trick)) != len(self.trick):
            raise bad("trick", "lists a trick twice")
        if self.method == "rifle" and self.reinit_trigger == "converged" and "cyclic-lr" in self.trick:
            # cyclic-lr restarts on the schedule trigger's points, which the converged trigger does not follow
            raise ConfigError(
                "--trick cyclic-lr cannot be combined with --reinit-trigger converged: its warm "
                "restarts fall on RIFLE's fixed schedule points (floor(i*E/(K+1))), while the "
                "converged trigger re-initialises only once the head has converged, possibly "
                "never; drop one (--reinit-trigger schedule keeps the restarts on the re-inits)"
            )
        if not isinstance(self.options, dict) or not all(isinstance(v, dict) for v in self.options.values()):
            raise ConfigError(f"options={self.options!r}: expected a mapping {{method: {{option: value}}}}")
        return self

    def _validate_reinit_init(self, bad) -> None:
        """--reinit-init: a name the CLI can take (a Python callable is for rifle.core.Rifle only)."""
        from .core.reinit import INITIALIZERS, canonical_init  # lazy: config stays a leaf otherwise

        names = [n for n in INITIALIZERS if n != "shrink_perturb"] + ["shrink_perturb[:LAMBDA,SIGMA]"]
        text = self.reinit_init
        name = text.strip().partition(":")[0].strip().replace("-", "_") if isinstance(text, str) else ""
        if name not in INITIALIZERS:
            alias = {
                "he": "kaiming_normal",
                "kaiming": "kaiming_normal",
                "lecun": "lecun_normal",
                "xavier": "xavier_uniform",
                "glorot": "xavier_uniform",
                "glorot_uniform": "xavier_uniform",
                "reset_parameters": "default",
            }.get(name)
            hint = f" (did you mean {alias}?)" if alias else _suggest(name, INITIALIZERS)
            raise bad(
                "reinit_init",
                f"unknown initialiser{hint}; choose {', '.join(names)} (- or _ both work; docs/rifle.md)",
            )
        try:
            canonical_init(text)
        except ValueError as e:
            raise bad("reinit_init", str(e)) from None

    def _validate_optimizer(self, bad) -> None:
        """--opt, --opt-eps, --opt-betas, --layer-decay (normalised in place)."""
        if not isinstance(self.opt, str) or not self.opt.strip():
            raise bad("opt", "name an optimizer: sgd (default) or one of timm.optim.list_optimizers()")
        self.opt = self.opt.strip().lower()
        for key in ("opt_eps", "layer_decay"):
            v = getattr(self, key)
            if v is not None:
                try:
                    setattr(self, key, float(v))  # YAML reads 1e-8 as a string
                except (TypeError, ValueError):
                    raise bad(key, "expected a number") from None
        if self.opt_eps is not None and not self.opt_eps > 0:
            raise bad("opt_eps", "must be > 0")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise bad(
                "layer_decay", "a factor in (0, 1]: layer i of L trains at layer_decay**(L-1-i) x the LR"
            )
        if self.opt_betas is not None:
            b = self.opt_betas
            if isinstance(b, str):
                b = b.replace(",", " ").split()
            try:
                b = [float(v) for v in b]
            except (TypeError, ValueError):
                raise bad("opt_betas", "expected two numbers, e.g. 0.9 0.999") from None
            if len(b) != 2 or not all(0 <= v < 1 for v in b):
                raise bad("opt_betas", "expected two numbers in [0, 1), e.g. 0.9 0.999")
            self.opt_betas = b
        from .train.optim import check_optimizer  # lazy: config stays a leaf for everything else

        problem = check_optimizer(
            self.opt, self.opt_eps, tuple(self.opt_betas) if self.opt_betas else None, device=self.device
        )
        if problem:
            raise bad("opt", problem)

    def method_options(self) -> dict[str, Any]:
        """Options handed to the ``--method`` plug-in: RIFLE's are top-level keys (``reinits``, ...), any
        other method's come from ``options: {<method>: {...}}`` (flags ``--<method>-<option>``)."""
        if self.method not in TOP_LEVEL_OPTIONS:
            return dict(self.options.get(self.method, {}))
        return dict(
            reinits=self.reinits,
            granularity=self.reinit_granularity,
            guard=self.guard,
            guard_steps=self.guard_steps,
            min_steps_after=self.min_steps_after,
            init=self.reinit_init,
            keep_optimizer_state=self.keep_optimizer_state,
            head_lr_restart=self.head_lr_restart,
            head=self.head,
            modules=self.reinit_modules,
            diagnose=self.diagnose,
            diagnosis_window=self.diagnosis_window,
            **(
                {"trigger": self.reinit_trigger, "converged_acc": self.reinit_converged_acc}
                if self.reinit_trigger != "schedule"
                else {}
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # REFERENCE.md §2, the official PyTorch script's recipe (needs the dataset and a GPU).
    # It trains on the whole train split (val_fraction 0: no validation carved out, as the script);
    # how it still differs from the script: README.md "The CLI" and docs/guide.md.
    "paper": dict(
        model="torchvision:resnet50",
        epochs=40,
        batch_size=32,
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        lr_schedule="cosine",
        image_size=224,
        reinits=3,
        keep_optimizer_state=True,
        val_fraction=0.0,
    ),
    # A recipe that finishes on 2 CPU cores: offline EfficientNet-Lite0 at 112 px, 12 epochs.
    "cpu": dict(model="efficientnet_lite0", epochs=12, batch_size=32, lr=0.01, image_size=112, reinits=1),
}

# Keys that may change between a run and its --resume (they do not change the numbers).
RESUMABLE_KEYS = {
    "out",
    "device",
    "threads",
    "eval_batch_size",
    "eval_test",
    "workers",
    "record_depth",
    "extra",
    "log_to",
    "log_interval",
    "cache_dir",
}
# Keys a run's config.yaml records beside the settings; `--config RUN/config.yaml` ignores them
# (resolved_methods is recomputed from method/reg/trick/options, world_size from torchrun).
# RunDir still compares them on --resume.
RECORDED_KEYS = {"resolved_methods", "world_size"}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _check_keys(values: dict[str, Any], source: str) -> None:
    for key in values:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, _FIELDS, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {p}: expected a mapping of keys to values, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values = {k: v for k, v in values.items() if k not in RECORDED_KEYS}  # a run's own config.yaml
    _check_keys(values, f"--config {p}")
    return values


def _merge(values: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``values`` updated by ``more``; ``options`` are merged per method and option, not replaced."""
    out = {**values, **more}
    if isinstance(values.get("options"), dict) and isinstance(more.get("options"), dict):
        options = {m: dict(o) for m, o in values["options"].items() if isinstance(o, dict)}
        for m, o in more["options"].items():
            options[m] = {**options.get(m, {}), **(o if isinstance(o, dict) else {})}
        out["options"] = options
    return out


def resolve(
    flags: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    preset: str | None = None,
    *,
    base: dict[str, Any] | None = None,
    cli: bool = False,
) -> TrainConfig:
    """defaults <- preset <- config file <- flags; returns a validated :class:`TrainConfig`.

    ``base`` (settings of a run, e.g. its ``config.yaml``) replaces the defaults. With another method
    than rifle, RIFLE-only keys (:data:`RIFLE_ONLY_KEYS`) that change a value in ``config_file`` are
    refused, and, with ``cli`` (the flags are ``rifle train``'s), any of them in ``flags``.
    """
    flags = dict(flags or {})
    file_values = load_config_file(config_file) if config_file else {}
    values: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in _FIELDS}
    preset = flags.pop("preset", None) or preset or file_values.get("preset")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(
                f"--preset={preset!r}: choose one of {', '.join(PRESETS)}{_suggest(preset, PRESETS)}"
            )
        values.update(PRESETS[preset])
    before_file = dict(values)
    values = _merge(values, file_values)
    _check_keys(flags, "flags")
    values = _merge(values, flags)
    values["preset"] = preset or values.get("preset")
    _refuse_rifle_only(values, flags if cli else {}, file_values, before_file, config_file)
    cfg = _build(values)
    _mark_given(cfg, [*file_values, *flags])
    return cfg


def rifle_only_keys(method: str, record_depth: bool = False) -> tuple[str, ...]:
    """The RIFLE-only keys (:data:`RIFLE_ONLY_KEYS`) a run of ``method`` must not set; none for RIFLE. With
    ``record_depth``, ``reinits`` and ``guard`` stay: the depth monitor marks the epochs where RIFLE-K
    would re-init."""
    if method.lower() == "rifle":
        return ()
    return tuple(k for k in RIFLE_ONLY_KEYS if not (record_depth and k in ("reinits", "guard")))


def _refuse_rifle_only(
    values: dict[str, Any],
    flags: dict[str, Any],
    file_values: dict[str, Any],
    before: dict[str, Any],
    config_file: str | Path | None,
) -> None:
    """RIFLE-only settings with another method (``values``: the merged settings) would be ignored: refuse
    each flag given, and each key of the config file that changes a value (a run's own config.yaml
    records every key, at its default or preset value, which changes nothing); see :func:`rifle_only_keys`."""
    method = str(values.get("method") or TrainConfig.method)
    keys = rifle_only_keys(method, values.get("record_depth") is True)
    given = [f"--{'no-' if flags[k] is False else ''}{k.replace('_', '-')}" for k in keys if k in flags]
    if given:
        raise ConfigError(
            f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --method rifle only "
            f"(the method is {method}): drop {'them' if len(given) > 1 else 'it'}, or use "
            f"--method rifle"
        )
    changed = []
    for key in keys:
        if key in file_values:
            value = _coerce(key, file_values[key])
            if value != before.get(key, getattr(TrainConfig, key)):
                changed.append(f"{key}: {value!r}")
    if changed:
        raise ConfigError(
            f"--config {config_file}: {', '.join(changed)} appl{'y' if len(changed) > 1 else 'ies'} "
            f"to --method rifle only (the method is {method}): remove "
            f"{'them' if len(changed) > 1 else 'it'}, or use --method rifle"
        )


def _mark_given(cfg: TrainConfig, keys) -> None:
    cfg.__dict__["given"] = frozenset(keys)  # an instance value of the ClassVar (not a field)


def _build(values: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig(**values)
    _coerce_types(cfg)
    return cfg.validate()


def resolve_resume(
    saved: dict[str, Any],
    flags: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    *,
    source: str = "config.yaml",
    strict: bool = True,
    cli: bool = False,
) -> TrainConfig:
    """The config of ``--resume``: the run's saved config, with the settings given now.

    ``saved`` (the run's ``config.yaml``) replaces defaults and preset (a preset's values are not applied
    again). With ``strict`` (the run has trained epochs), a given setting (config file or flag; paths
    compared after normalisation) that differs from the saved one is an error listing only the
    differing keys; settings in :data:`RESUMABLE_KEYS` (``out``, ``device``, ...) are taken from what
    was given. Without ``strict`` (nothing was trained yet) the given settings win.
    """
    base = {k: v for k, v in saved.items() if k in _FIELDS}
    if not strict:
        return resolve(flags, config_file, base=base, cli=cli)
    given = load_config_file(config_file) if config_file else {}
    _check_keys(flags or {}, "flags")
    _refuse_rifle_only(
        _merge(_merge(base, given), dict(flags or {})), (flags or {}) if cli else {}, given, base, config_file
    )
    merged = _build(_merge(_merge(base, given), dict(flags or {})))
    diff = diff_configs({k: v for k, v in saved.items() if k != "world_size"}, merged.to_dict())
    if diff:
        raise ConfigError(
            f"--resume: the settings given differ from the run's {source}: "
            f"{format_diff(diff)}. Resume without them (--resume alone continues the run "
            f"with its own settings), or start a new run in another --out"
        )
    cfg = _build({**base, **{k: getattr(merged, k) for k in RESUMABLE_KEYS}})
    _mark_given(cfg, [*given, *(flags or {})])
    return cfg


def _coerce(name: str, v: Any) -> Any:
    """``v`` as the type of the field ``name``: YAML gives ints for floats (lr: 1) and strings for numbers
    written as 1e-4 or 9e-1 (YAML 1.1 needs a dot); an int may be written 1e3 or 8.0, not 2.5."""
    t = str(_FIELDS[name].type)
    base = t.split(" |")[0]
    if v is None or isinstance(v, bool) or base not in ("int", "float"):
        return v
    flag = f"--{name.replace('_', '-')}={v!r}"
    try:
        number = float(v) if isinstance(v, str) else v
    except ValueError:
        raise ConfigError(f"{flag}: expected {'an integer' if base == 'int' else 'a number'}") from None
    if not isinstance(number, (int, float)):
        return v  # a list or mapping: validate() names it
    if base == "float":
        return float(number)
    if isinstance(number, float):
        if not number.is_integer():
            raise ConfigError(f"{flag}: expected an integer")
        return int(number)
    return number


def _coerce_types(cfg: TrainConfig) -> None:
    """Every int and float field (``int | None`` and ``float | None`` too) through :func:`_coerce`."""
    for f in fields(cfg):
        setattr(cfg, f.name, _coerce(f.name, getattr(cfg, f.name)))


def normalize_path(value: Any) -> Any:
    """A data / out value for comparison: a built-in dataset name as is, a path made absolute (the ROOT
    of a published dataset's ``NAME:ROOT`` too, its options in a fixed order)."""
    if not isinstance(value, str) or not value.strip():
        return value
    from .data.builtin import BUILTIN  # lazy: config stays a leaf for everything else
    from .data.published import parse_spec

    if value.strip().lower() in BUILTIN and "/" not in value and os.sep not in value:
        return value.strip().lower()
    try:
        spec = parse_spec(value)
    except ValueError:  # a misspelt published name: compared as written
        spec = None
    if spec is not None:
        return spec.canonical(os.path.normpath(os.path.abspath(os.path.expanduser(spec.root))))
    return os.path.normpath(os.path.abspath(os.path.expanduser(value)))


def _method_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"<method>.<option>": value}``: what each plug-in resolved, overridden by explicit options."""
    out = {}
    for source in ("resolved_methods", "options"):
        for m, opts in (cfg.get(source) or {}).items():
            for k, v in (opts or {}).items():
                out[f"{m}.{k}"] = v
    return out


# keys added after runs were recorded: their value in an older config.yaml
ADDED_KEYS = {
    "reinit_trigger": "schedule",
    "reinit_converged_acc": None,
    "diagnose": True,
    "opt": "sgd",
    "opt_eps": None,
    "opt_betas": None,
    "layer_decay": None,
    "pretrained_file": None,
    "diagnosis_window": 5,
    "log_to": "auto",
    "log_interval": 50,
    "label_noise": 0.0,
    "label_smoothing": 0.0,
    "train_per_class": None,
}


def diff_configs(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings (other than :data:`RESUMABLE_KEYS`) whose values differ: ``{key: (saved, current)}``.

    ``data`` paths are compared after :func:`normalize_path`. Plug-in options are compared one by one
    (``options.l2sp.alpha``), never as whole dictionaries: an explicit option against the saved one or,
    when it was not given, against what the plug-in resolved (``resolved_methods``); the main method's
    own options, for RIFLE, are the top-level keys (``reinits``, ...) and are compared there.
    """
    saved = {**ADDED_KEYS, **saved}  # a config.yaml written before a key existed had its default
    keys = (set(saved) | set(current)) - RESUMABLE_KEYS - {"options", "resolved_methods"}
    paths = ("data", "pretrained_file")
    a = {k: normalize_path(v) if k in paths else v for k, v in saved.items()}
    b = {k: normalize_path(v) if k in paths else v for k, v in current.items()}
    diff = {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}
    oa, ob = _method_options(saved), _method_options(current)
    both_resolved = "resolved_methods" in saved and "resolved_methods" in current
    main = {saved.get("method"), current.get("method")} & set(TOP_LEVEL_OPTIONS)
    for k in sorted(set(oa) | set(ob)):
        if k.split(".", 1)[0] in main or not (both_resolved or (k in oa and k in ob)):
            continue
        if oa.get(k) != ob.get(k):
            diff["options." + k] = (oa.get(k), ob.get(k))
    return diff


def format_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    """``key: saved -> given, ...``."""
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def from_dict(values: dict[str, Any]) -> TrainConfig:
    known = {k: v for k, v in values.items() if k in _FIELDS}
    return dataclasses.replace(TrainConfig(), **known)
