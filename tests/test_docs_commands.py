"""README.md's and docs/rifle.md's commands cannot rot (as docs/guide.md's, tests/test_guide.py).

Every `rifle ...` line of their ```bash blocks is parsed by the real CLI parser, a `rifle train` line is
also resolved into a validated config, and the cheap ones run, in the order written, in a temporary
folder. The rules, applied by :func:`commands` and :func:`runnable`:

* `torchrun ... -m rifle ARGS` is checked as `rifle ARGS`; `A && B` as two commands; `{a,b}` expands as in
  bash; other lines (`make`, `pip`, `tensorboard`) are not commands of ours.
* Run: every `rifle train`, `predict`, `evaluate`, `export`, and `rifle bench` with `--list` appended (it
  reads and checks the grid, runs nothing). Parsed only: `rifle demo` (minutes), `rifle report` /
  `analyze` of the bench grid (not run), and the torchrun line (two processes).
* Inputs: `path/to/folder` and `path/to/held_out_folder` are tiny generated image folders, `photo.jpg`
  and `more_photos/` generated images, `benchmarks/` the repository's; `--data elpv` runs as
  `--data digits` (ELPV's first load decodes 2,600 images).
* A `rifle train` runs with `--model tiny_cnn --image-size 16 --epochs 4 --train-fraction 0.2` appended
  (later flags win), except the converged-trigger example, which runs as written so that what rifle.md
  says it does is checked; every one with `--threads 1 --quiet`, and a `--method rifle` one with
  `--min-steps-after 0`.
"""

import json
import re
import shlex
from itertools import product
from pathlib import Path

import pytest

from conftest import make_image_folder
from rifle.cli import build_parser, main
from rifle.commands.train import config_from_args

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "rifle.md"]
SMALL = ["--model", "tiny_cnn", "--image-size", "16", "--epochs", "4", "--train-fraction", "0.2"]
ALWAYS = ["--threads", "1", "--quiet"]
RIFLE_ONLY = ["--min-steps-after", "0"]  # a RIFLE flag: refused with another method
PARSE_ONLY = {"demo", "report", "analyze"}


def braces(word: str) -> list[str]:
    """Bash brace expansion of one word (`a/{x,y}/b` -> `a/x/b`, `a/y/b`)."""
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", word)
    return ["".join(p) for p in product(*[[s] if i % 2 == 0 else s.split(",") for i, s in enumerate(parts)])]


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(the line as written, the `rifle` argv) of every command in ``path``'s ```bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for cmd in line.split(" && "):
                words = shlex.split(cmd, comments=True)
                if words[:1] == ["torchrun"] and "-m" in words:
                    words = words[words.index("-m") + 1 :]
                if words[:1] != ["rifle"] or len(words) < 2 or words[1].startswith("-"):
                    continue  # make, pip, tensorboard, `rifle --help`
                out.append((line, [w for word in words[1:] for w in braces(word)]))
    return out


def runnable(argv: list[str], root: Path) -> list[str] | None:
    """The argv actually run (the rules above), or None for a command only parsed."""
    if argv[0] in PARSE_ONLY:
        return None
    subst = {
        "path/to/folder": str(root / "folder"),
        "path/to/held_out_folder": str(root / "held_out"),
        "elpv": "digits",
    }
    run = [subst.get(a, a) for a in argv]
    run = [str(ROOT / a) if a.startswith("benchmarks/") else a for a in run]
    if run[0] == "bench":
        return run + ["--list"]
    if run[0] == "train" and "--resume" not in run:
        is_rifle = any(a == "--method" and b == "rifle" for a, b in zip(run, run[1:]))
        return run + ([] if "--reinit-trigger" in run else SMALL) + (RIFLE_ONLY if is_rifle else []) + ALWAYS
    return run


def out_of(argv: list[str]) -> str | None:
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"), None)


def test_docs_have_commands_and_every_train_has_its_own_out():
    found = {p.name: commands(p) for p in DOCS}
    assert len(found["README.md"]) >= 12 and len(found["rifle.md"]) >= 3
    trains = [argv for cmds in found.values() for _, argv in cmds if argv[0] == "train"]
    fresh = [out_of(a) for a in trains if "--resume" not in a]
    assert None not in fresh, "a `rifle train` example without --out collides on runs/train"
    assert len(fresh) == len(set(fresh)), f"two examples share an --out: {fresh}"
    assert all(out_of(a) in fresh for a in trains if "--resume" in a)  # resumes a run the docs started


@pytest.mark.slow
def test_every_docs_command_parses_and_the_cheap_ones_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "folder", classes=("cat", "dog"), per_class=(10, 4), size=(20, 18))
    held = make_image_folder(tmp_path / "held", classes=("cat", "dog"), per_class=(3,), splits=("x",))
    (held / "x").rename(tmp_path / "held_out")
    (tmp_path / "held_out" / "cat" / "0.png").rename(tmp_path / "photo.jpg")
    (tmp_path / "held_out" / "dog").rename(tmp_path / "more_photos")
    (tmp_path / "held_out" / "dog").mkdir()
    (tmp_path / "more_photos" / "0.png").rename(tmp_path / "held_out" / "dog" / "0.png")
    parser, ran = build_parser(), []
    for doc in DOCS:
        for line, argv in commands(doc):
            args = parser.parse_args(argv)  # every flag exists and every value has its type / choice
            del args._run
            if argv[0] == "train" and "--resume" not in argv:
                config_from_args(args)  # the values are valid (ConfigError otherwise)
            run = runnable(argv, tmp_path)
            if run is None:
                continue
            code = main(run)
            out, err = capsys.readouterr()
            assert code == 0, f"{doc.name}: `{line}` (run as {run}) exited {code}: {err[-2000:]}"
            ran.append((argv, out))
    assert len(ran) >= 12
    # what the docs say these commands do
    trigger = json.loads((tmp_path / "runs/trigger/summary.json").read_text())
    assert trigger["rifle_trigger"]["fired"] == [3, 5]  # rifle.md: "fires at epochs 3 and 5"
    assert (tmp_path / "runs/mine/model.onnx").is_file()
    predicted = next(out for argv, out in ran if argv[0] == "predict")
    assert "photo.jpg" in predicted and "more_photos" in predicted
    # a docs command re-run on its own --out is refused with every way out named
    first = commands(DOCS[0])[0][1]
    assert main(runnable(first, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "another --out" in err


@pytest.mark.slow
def test_rifle_md_measured_table_first_row_and_the_quoted_verdict(tmp_path, monkeypatch, capsys):
    """docs/rifle.md#when's first measured row, run with the command written beside the table (~15 s on
    one thread): its numbers, and the verdict line README and rifle.md quote from it, are what it prints."""
    monkeypatch.chdir(tmp_path)
    text = " ".join(DOCS[1].read_text().split("**Measured with the diagnosis itself**")[1].split())
    base = re.search(r"`(rifle train [^`]*)` plus the flags shown", text).group(1)
    row = re.search(r"\| `(--epochs 12[^`]*)` \|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|", text)
    flags, acc, norms, thirds, signal = (c.strip() for c in row.groups())
    assert main([*shlex.split(base)[1:], *shlex.split(flags), "--out", "row1", "--quiet"]) == 0
    capsys.readouterr()
    d = json.loads((tmp_path / "row1/summary.json").read_text())["rifle_diagnosis"][0]
    assert acc == f"{d['train_loss_before']:.2f} / {d['train_acc_before']:.2f}"
    assert norms == f"{d['head_norm_before']:.1f} → {d['head_norm_after']:.1f}"
    assert thirds == " / ".join(f"{r:.2f}" for r in d["grad_ratio_thirds"]) + f" ({d['grad_ratio']:.2f})"
    assert signal == f"x{d['head_signal_ratio']:.2f}"
    for doc in DOCS:  # quoted verbatim (README wraps it over lines)
        assert d["verdict"] in " ".join(doc.read_text().split()), doc.name
