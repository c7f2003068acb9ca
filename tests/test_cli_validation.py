"""Bad or meaningless settings refused before any work, with a one-line error naming the flag (issue 20:
defects 6, 8, 10, 12 and the messages of 15), and what `rifle train --help` says."""

import re
from dataclasses import fields

import pytest
import torch
import yaml
from torch import nn

from conftest import run_cli as run
from rifle.config import ConfigError, TrainConfig, resolve, resolve_resume

TINY = [
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--image-size",
    "16",
    "--batch-size",
    "64",
    "--epochs",
    "1",
    "--train-fraction",
    "0.1",
    "--quiet",
]


def refused(argv, capsys, tmp_path):
    """``rifle train ARGV --out tmp/out``: exit 2, one line on stderr, nothing written; returns the line."""
    out = tmp_path / "out"
    code, stdout, err = run(["train", *argv, "--out", str(out)], capsys)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    assert not out.exists()  # refused before the run folder (and the data) were touched
    return lines[0]


# ----------------------------------------------------- defect 6: RIFLE-only settings with another method
def test_rifle_only_flags_with_another_method_are_refused_naming_each(tmp_path, capsys):
    line = refused(
        ["--method", "lp-ft", "--reinit-trigger", "converged", "--reinit-init", "shrink-perturb", *TINY],
        capsys,
        tmp_path,
    )
    assert "--reinit-trigger" in line and "--reinit-init" in line and "--method rifle only" in line
    assert "lp-ft" in line
    assert "--reinits" not in line and "--diagnose" not in line  # defaults are not named, only flags given
    line = refused(["--no-diagnose", "--min-steps-after", "0", *TINY], capsys, tmp_path)  # finetune: default
    assert "--no-diagnose" in line and "--min-steps-after" in line and "finetune" in line


def test_presets_and_defaults_of_rifle_keys_are_not_refused():
    # the cpu preset sets reinits=1: not given by the user, so fine with another method
    assert resolve({"method": "finetune"}, preset="cpu", cli=True).reinits == 1
    assert resolve({"method": "rifle", "reinit_trigger": "converged"}, cli=True).reinit_trigger == "converged"
    # --record-depth marks the epochs where RIFLE-K would re-init (analysis.monitor): K and the guard count
    c = resolve({"method": "finetune", "record_depth": True, "reinits": 2, "guard": 1}, cli=True)
    assert (c.reinits, c.guard) == (2, 1)
    with pytest.raises(ConfigError, match="^--reinits applies to --method rifle only"):
        resolve({"method": "finetune", "reinits": 2}, cli=True)


def test_config_file_rifle_only_keys_refused_unless_they_change_nothing(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: lp-ft\nreinit_trigger: converged\nreinits: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"--config .*c\.yaml: reinits: 2, reinit_trigger: 'converged' apply "
        r"to --method rifle only \(the method is lp-ft\)",
    ):
        resolve({}, config_file=f)
    # a finished run's own config.yaml records every key at its default / preset value: accepted
    saved = TrainConfig(method="finetune", preset="cpu", reinits=1, epochs=2).validate().to_dict()
    f.write_text(yaml.safe_dump(saved))
    assert resolve({}, config_file=f).method == "finetune"
    f.write_text(yaml.safe_dump({**saved, "diagnosis_window": 3}))
    with pytest.raises(ConfigError, match="diagnosis_window: 3 applies to --method rifle only"):
        resolve({}, config_file=f)


def test_resume_of_a_finetune_run_refuses_a_rifle_flag():
    saved = TrainConfig(method="finetune").validate().to_dict()
    with pytest.raises(ConfigError, match="--reinits applies to --method rifle only"):
        resolve_resume(saved, {"reinits": 3}, cli=True)


# --------------------------------------------------- defect 8: numbers written as strings by YAML
FLOATS = [f.name for f in fields(TrainConfig) if str(f.type).split(" |")[0] == "float"]
NEEDS = {
    "reinit_converged_acc": {"method": "rifle", "reinit_trigger": "converged"},
    "opt_eps": {"opt": "adamw"},
    "layer_decay": {"model": "tiny_cnn"},
}


def test_every_float_field_is_listed():
    assert set(FLOATS) == {
        "lr",
        "momentum",
        "weight_decay",
        "reinit_converged_acc",
        "opt_eps",
        "layer_decay",
        "val_fraction",
        "train_fraction",
        "label_noise",
        "label_smoothing",
    }


@pytest.mark.parametrize("key", FLOATS)
def test_float_in_scientific_notation_from_yaml(tmp_path, key):
    f = tmp_path / "c.yaml"
    f.write_text("".join(f"{k}: {v}\n" for k, v in NEEDS.get(key, {}).items()) + f"{key}: 5e-1\n")
    assert yaml.safe_load(f.read_text())[key] == "5e-1"  # YAML 1.1 wants a dot: a string
    value = getattr(resolve({}, config_file=f), key)
    assert value == 0.5 and type(value) is float


def test_reinit_converged_acc_9e_1_is_0_9(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: rifle\nreinit_trigger: converged\nreinit_converged_acc: 9e-1\n")
    assert resolve({}, config_file=f).reinit_converged_acc == 0.9


def test_ints_written_as_strings_or_whole_floats(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 1e1\nbatch_size: '16'\nimage_size: 32.0\nguard: '2'\nmethod: rifle\n")
    c = resolve({}, config_file=f)
    assert (c.epochs, c.batch_size, c.image_size, c.guard) == (10, 16, 32, 2)
    assert all(type(v) is int for v in (c.epochs, c.batch_size, c.image_size, c.guard))
    f.write_text("epochs: 2.5\n")
    with pytest.raises(ConfigError, match=r"--epochs=2\.5: expected an integer"):
        resolve({}, config_file=f)
    f.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"--lr='fast': expected a number"):
        resolve({}, config_file=f)


def test_plugin_float_option_in_scientific_notation(tmp_path):
    from rifle.build import build_methods

    f = tmp_path / "c.yaml"
    f.write_text(
        "reg: l2sp\ntrick: [dropout]\noptions: {l2sp: {alpha: 1e-2, beta: 2e-4}, dropout: {p: 3e-1}}\n"
    )
    methods = {m.name: m for m in build_methods(resolve({}, config_file=f))}
    assert (methods["l2sp"].alpha, methods["l2sp"].beta, methods["dropout"].p) == (0.01, 0.0002, 0.3)
    f.write_text("reg: l2sp\noptions: {l2sp: {alpha: lots}}\n")
    with pytest.raises(ValueError, match=r"--l2sp-alpha='lots' \(options.l2sp.alpha\): expected a number"):
        build_methods(resolve({}, config_file=f))


# --------------------------------------------------- defect 10: --reinit-init checked before any work
def test_bad_reinit_init_refused_before_any_work(tmp_path, capsys):
    line = refused(["--method", "rifle", "--reinit-init", "bogus", *TINY], capsys, tmp_path)
    assert "--reinit-init='bogus': unknown initialiser" in line and "callable" not in line
    assert "norm_matched" in line and "shrink_perturb[:LAMBDA,SIGMA]" in line
    line = refused(["--method", "rifle", "--reinit-init", "shrink-perturb:2,1", *TINY], capsys, tmp_path)
    assert "0 <= LAMBDA <= 1" in line and "callable" not in line


def test_both_spellings_of_an_initialiser_are_accepted():
    for init in ("norm-matched", "norm_matched", "shrink-perturb:0.5,0.2", "shrink_perturb"):
        assert resolve({"method": "rifle", "reinit_init": init}).reinit_init == init


# ------------------------------------------------------- defect 12: RIFLE with K = 0 is fine-tuning
def test_rifle_with_no_reinit_is_refused(tmp_path, capsys):
    line = refused(["--method", "rifle", "--reinits", "0", *TINY], capsys, tmp_path)
    assert "--reinits=0" in line and "--method finetune" in line


def test_grid_rifle_k0_is_refused():
    from rifle.experiments.grid import GridError, parse_grid

    spec = {
        "datasets": ["digits"],
        "models": ["tiny_cnn"],
        "seeds": [0],
        "methods": [{"name": "finetune"}, {"name": "rifle", "reinits": 0}],
    }
    with pytest.raises(GridError, match=r"methods\[1\] \(rifle\): --reinits=0: .*--method finetune"):
        parse_grid(spec)


# ------------------------------------------------------------------------ defect 15: the messages
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--method", "RIFLE"], "did you mean rifle?"),
        (["--preset", "CPU"], "did you mean cpu?"),
        (["--reg", "L2SP"], "did you mean l2sp"),
        (["--method", "rifle", "--reinit-init", "he"], "did you mean kaiming_normal?"),
        (["--method", "rifle", "--reinit-trigger", "Converged"], "did you mean converged?"),
    ],
)
def test_wrong_case_or_alias_gets_a_one_line_suggestion(tmp_path, capsys, argv, needle):
    assert needle in refused([*argv, *TINY], capsys, tmp_path)


def test_argparse_errors_are_one_line(capsys):
    from rifle.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "rifle train: error: argument --epochs: invalid int value: 'many' (see rifle train --help)\n"
    )


def test_model_suggestion_lists_each_name_once():
    from rifle.models import ModelError, create_model

    with pytest.raises(ModelError) as e:
        create_model("efficientnet-lite0", 2)
    names = re.search(r"Did you mean: (.*?)\?", str(e.value)).group(1).split(", ")
    assert names[0] == "efficientnet_lite0" and len(names) == len(set(names)), names


def test_short_period_warning_names_the_flag():
    from rifle.core.schedule import RifleScheduleWarning
    from rifle.methods.base import RunContext
    from rifle.methods.rifle import RifleMethod

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ctx = RunContext(
        epochs=4,
        steps_per_epoch=3,
        seed=0,
        num_classes=2,
        head=[model[1]],
        head_names=["1"],
        log=lambda s: None,
    )
    with pytest.warns(RifleScheduleWarning) as caught:
        RifleMethod(reinits=1).setup(model, torch.optim.SGD(model.parameters(), lr=0.1), ctx)
    [text] = [str(w.message) for w in caught]
    assert "fewer than --min-steps-after 100" in text and "set --min-steps-after 0 to silence" in text
    assert "min_steps_after" not in text


def test_l2sp_weight_decay_note_only_when_the_flag_was_given(tmp_path, capsys):
    args = ["train", "--reg", "l2sp", *TINY[:-1]]  # not --quiet: the setup lines are what is checked
    code, stdout, err = run([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "L2-SP: alpha=0.01" in stdout and "weight-decay" not in stdout
    code, stdout, err = run([*args, "--weight-decay", "0.001", "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert "l2sp: --weight-decay 0.001 is ignored" in stdout


# ---------------------------------------------------------------------------- --opt needs CUDA
@pytest.mark.parametrize("opt", ["fusedadam", "bnbadamw8bit"])
def test_cuda_only_optimizer_refused_on_the_cpu(tmp_path, capsys, opt):
    line = refused(["--opt", opt, "--device", "cpu", *TINY], capsys, tmp_path)
    assert f"--opt='{opt}': needs CUDA" in line and "--device cpu" in line
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in refused(["--opt", opt, *TINY], capsys, tmp_path)


# ------------------------------------------------------------------------------- rifle train --help
def help_entries(capsys, monkeypatch) -> tuple[str, dict[str, str]]:
    from rifle.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    entries = {}
    for e in re.split(r"\n(?=  -)", text):
        if e.lstrip().startswith("--"):
            entries[e.split()[0].rstrip(",")] = " ".join(e.split())
    return text, entries


def test_help_tells_the_truth(capsys, monkeypatch):
    text, h = help_entries(capsys, monkeypatch)
    assert "default default" not in h["--reinit-init"] and "(default 'default')" in h["--reinit-init"]
    assert "norm_matched" in h["--reinit-init"] and "norm-matched" not in h["--reinit-init"]
    assert "- or _ both work" in h["--reinit-init"]
    assert "head-signal ratio" in h["--diagnose"] and "decides the verdict" in h["--diagnose"]
    assert "lp-ft restarts it for each phase" in h["--lr-schedule"]
    assert "--reinit-trigger {schedule,converged}" in h["--reinit-trigger"]
    assert "--reinit-granularity {epoch,step}" in h["--reinit-granularity"]
    assert "bnb* and fused* need CUDA" in h["--opt"]
    flags = list(h)
    assert flags.index("--opt-eps") == flags.index("--opt") + 1
    assert flags.index("--opt-betas") == flags.index("--opt") + 2
    # the RIFLE-only flags are in their own group, and only they
    group = text.split("RIFLE (--method rifle only):", 1)[1].split("\n\n", 2)[1].split("\n\n")[0]
    in_group = {
        e.split()[0].rstrip(",") for e in re.split(r"\n(?=  -)", group) if e.lstrip().startswith("--")
    }
    from rifle.config import RIFLE_ONLY_KEYS

    assert in_group == {"--" + k.replace("_", "-") for k in RIFLE_ONLY_KEYS}
    assert "--head" not in in_group and "--method" not in in_group
