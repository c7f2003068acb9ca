"""--label-smoothing EPS (issue 21 §3): a trick changing the training loss only, torch's semantics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli as run
from rifle.build import build_methods
from rifle.config import ConfigError, TrainConfig, resolve
from rifle.methods import create

FAST = ["--model", "tiny_cnn", "--image-size", "16", "--batch-size", "32", "--quiet"]


def test_one_batch_loss_is_the_hand_computed_smoothed_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 1])
    eps = 0.2
    # by hand: target (1 - eps) one-hot + eps / C; loss = -sum target * log_softmax, mean over the batch
    expected = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        logz = math.log(sum(math.exp(v) for v in row))
        logp = [v - logz for v in row]
        expected += -sum(((1 - eps) * (k == label) + eps / 3) * lp for k, lp in enumerate(logp))
    expected /= 2
    ls = create("label-smoothing", eps=eps)
    terms = ls.loss_terms(logits, None, None, y)
    total = F.cross_entropy(logits, y) + sum(terms.values())  # what the trainer sums
    assert float(total) == pytest.approx(expected, abs=1e-6)
    assert float(total) == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=eps)), abs=1e-6)
    assert create("label-smoothing", eps=0.0).loss_terms(logits, None, None, y) == {}


def test_the_flag_alone_adds_the_trick_composable_with_others():
    names = [m.name for m in build_methods(resolve({"label_smoothing": 0.1, "method": "rifle"}))]
    assert names == ["rifle", "l2", "label-smoothing"]
    methods = build_methods(resolve({"label_smoothing": 0.05, "trick": ["dropout"]}))
    assert [m.name for m in methods] == ["finetune", "l2", "dropout", "label-smoothing"]
    assert methods[-1].eps == 0.05
    assert [m.name for m in build_methods(TrainConfig().validate())] == ["finetune", "l2"]


@pytest.mark.parametrize("eps", [1.0, -0.1, 2, float("nan"), "x"])
def test_eps_outside_0_1_is_a_clear_error(eps):
    with pytest.raises(ConfigError, match="--label-smoothing="):
        resolve({"label_smoothing": eps})
    with pytest.raises(ValueError, match="label-smoothing"):
        create("label-smoothing", eps=eps)


def test_cli_errors_and_help(tmp_path, capsys):
    code, _, err = run(["train", "--label-smoothing", "1", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "--label-smoothing=1.0" in err and "[0, 1)" in err, err
    code, _, err = run(
        ["train", "--label-smoothing", "0.1", "--trick", "label-smoothing", "--out", str(tmp_path / "r")],
        capsys,
    )
    assert code == 2 and "use one" in err, err
    code, _, err = run(
        ["train", "--label-smoothing", "0.1", "--label-smoothing-eps", "0.2", "--out", str(tmp_path / "r")],
        capsys,
    )
    assert code == 2 and "use one" in err, err
    # the trick's own spelling is the same trick
    cfg = resolve({"trick": ["label-smoothing"], "options": {"label-smoothing": {"eps": 0.2}}})
    assert [m.config() for m in build_methods(cfg)][-1] == {"eps": 0.2}
    with pytest.raises(SystemExit):
        run(["train", "--help"], capsys)
    assert "--label-smoothing" in capsys.readouterr().out


def test_rifle_with_label_smoothing_trains_and_only_the_training_loss_changes(tmp_path, capsys):
    from rifle.build import load_data
    from rifle.inference import load

    out = tmp_path / "ls"
    args = ["--data", "digits", "--train-fraction", "0.3", "--epochs", "2", "--method", "rifle"]
    args += ["--reinits", "1", "--min-steps-after", "0", "--label-smoothing", "0.1", *FAST]
    code, _, err = run(["train", *args, "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["methods"]["label-smoothing"] == {"eps": 0.1}
    assert summary["reinit_epochs"] == [1]
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    # training: the plain cross-entropy (train_loss) plus the smoothing term (loss_label_smoothing)
    assert all(r["loss_label_smoothing"] != 0 for r in rows)
    # evaluation: the plain cross-entropy of the final model, not the smoothed one
    fm = load(out)
    test = load_data(TrainConfig(data="digits", train_fraction=0.3, image_size=16)).test
    logits = fm.logits_of_decoded(list(test.images))
    plain = float(F.cross_entropy(logits, test.labels))
    smoothed = float(F.cross_entropy(logits, test.labels, label_smoothing=0.1))
    assert rows[-1]["test_loss"] == pytest.approx(plain, abs=1e-4)
    assert abs(smoothed - plain) > 1e-2
