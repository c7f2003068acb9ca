"""docs/guide.md cannot rot: every `rifle` command and Python block in it runs here.

The commands run as written, on a tiny generated `my_photos/` folder and held-out folder, with
`--epochs 2 --image-size 32 --batch-size 8` appended to `rifle train` (later flags win) so the suite
stays fast. ```sh blocks (installation) are not executed.
"""

import re
import shlex
from pathlib import Path

import pytest

from conftest import make_image_folder
from rifle.cli import main

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
FAST_TRAIN = ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--quiet"]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_commands_and_code():
    assert len([c for b in blocks("bash") for c in b.splitlines() if c.startswith("rifle ")]) >= 7
    assert len(blocks("python")) >= 2


@pytest.mark.slow
def test_every_guide_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "my_photos", classes=("cat", "dog"), per_class=(10, 4), size=(40, 36))
    held = make_image_folder(
        tmp_path / "held", classes=("cat", "dog"), per_class=(3,), splits=("x",), size=(40, 36)
    )
    (held / "x").rename(tmp_path / "my_heldout_photos")
    ran = 0
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():  # a command continued with a backslash
            if not line.startswith("rifle "):
                continue
            argv = shlex.split(line)[1:]
            if argv[0] == "train":
                argv += FAST_TRAIN
            code = main(argv)
            out, err = capsys.readouterr()
            assert code == 0, f"`{line}` exited {code}: {err[-2000:]}"
            ran += 1
    assert (tmp_path / "runs/guide/model.onnx").is_file() and (
        tmp_path / "runs/guide/model.onnx.json"
    ).is_file()
    assert (tmp_path / "runs/guide/model.pt.json").is_file()
    assert (tmp_path / "runs/guide/model.pt").is_file()
    for code in blocks("python"):
        exec(compile(code, str(GUIDE), "exec"), {"__name__": "guide"})
    out = capsys.readouterr().out
    assert "['cat', 'dog']" in out and "[4]" in out
    assert ran >= 7
