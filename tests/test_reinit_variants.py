"""Re-init variants beyond the paper (issue 12 item 2; docs/rifle.md "Initialisers"):
``norm_matched`` (the default draw rescaled to the old head's row norms) and ``shrink_perturb``
(Ash & Adams 2020: shrink * old + perturb * default draw). Exact semantics, then end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from conftest import interrupted_at_epoch
from rifle import Rifle
from rifle.cli import main
from rifle.core.reinit import canonical_init, draw_state, draw_values
from rifle.models import create_model


def trained_head(seed=0) -> nn.Linear:
    """A 48 -> 10 head whose rows have very different norms (as after training) and one zero row."""
    torch.manual_seed(seed)
    head = nn.Linear(48, 10)
    with torch.no_grad():
        head.weight.mul_(torch.logspace(-1, 1.5, 10).unsqueeze(1))
        head.weight[3] = 0
        head.bias.mul_(7)
    return head


def trained_tiny_cnn(seed=0) -> nn.Module:
    """tiny_cnn after a few optimizer steps: BN affine parameters and statistics moved off 1 / 0."""
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        x = torch.randn(8, 3, 16, 16) * 2 + 1
        nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,))).backward()
        opt.step()
        opt.zero_grad()
    return model


def row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().double().reshape(w.shape[0], -1).norm(dim=1)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.detach().double().reshape(a.shape[0], -1), b.detach().double().reshape(b.shape[0], -1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ------------------------------------------------------------------------------------ norm_matched
def test_norm_matched_keeps_every_row_norm_and_takes_the_default_draws_direction():
    head = trained_head()
    old_w, old_b = head.weight.detach().clone(), head.bias.detach().clone()
    w, b = draw_values([head], 0, 1, "norm_matched")[0]
    dw, db = draw_values([head], 0, 1, "default")[0]  # the same generator stream
    assert torch.allclose(row_norms(w), row_norms(old_w), rtol=1e-6, atol=1e-6)
    live = [i for i in range(10) if i != 3]
    assert torch.allclose(cosines(w[live], dw[live]), torch.ones(9, dtype=torch.float64), atol=1e-6)
    assert torch.equal(w[3], torch.zeros(48)) and torch.isfinite(w).all()  # old norm 0: stays 0, no NaN
    # the bias vector as a whole: the old bias's norm, the default bias's direction
    assert float(b.double().norm()) == pytest.approx(float(old_b.double().norm()), rel=1e-6)
    assert float(cosines(b[None], db[None])) == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(w, old_w)  # a new head, not the old one
    assert float(row_norms(dw).max()) < 0.2 * float(row_norms(old_w).max())  # default is far smaller


def test_norm_matched_is_a_pure_function_of_seed_and_index():
    a, b = trained_head(), trained_head()  # two "ranks", or a run and its resume
    first, second = draw_values([a], 5, 2, "norm_matched")[0], draw_values([b], 5, 2, "norm_matched")[0]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    other = draw_values([a], 5, 3, "norm_matched")[0]
    assert not torch.allclose(first[0], other[0])
    # in place through Rifle: every spelling draws the same head, and no global RNG moves
    cpu = torch.random.get_rng_state()
    heads = []
    for spelling in ("norm_matched", "norm-matched"):
        model = nn.Sequential(nn.Linear(6, 48), nn.ReLU(), trained_head())
        Rifle(model, None, epochs=4, reinits=1, seed=5, init=spelling, min_steps_after=None).reinit(2)
        heads.append(model[2].weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], first[0])
    assert torch.equal(torch.random.get_rng_state(), cpu)


def test_norm_matched_on_blocks_rescales_conv_rows_and_batchnorm_as_a_whole():
    model = trained_tiny_cnn()
    block = model.blocks[2]
    old = {k: v.detach().clone() for k, v in block.state_dict().items()}
    old_fc = model.fc.weight.detach().clone()
    Rifle(
        model, None, epochs=4, reinits=1, modules="last:1", init="norm_matched", min_steps_after=None
    ).reinit(1)
    assert torch.allclose(row_norms(model.fc.weight), row_norms(old_fc), rtol=1e-6, atol=1e-6)
    new = block.state_dict()
    convs = [k for k in new if k.endswith("weight") and new[k].dim() == 4]
    bns = [k[: -len(".running_var")] for k in new if k.endswith(".running_var")]
    assert len(convs) == 3 and len(bns) == 3
    for k in convs:  # rows = output channels (dim 0)
        assert torch.allclose(row_norms(new[k]), row_norms(old[k]), rtol=1e-6, atol=1e-6), k
        assert not torch.allclose(new[k], old[k]), k
    for k in bns:
        gamma, c = new[k + ".weight"], new[k + ".weight"].numel()
        # the fresh gamma (all ones) scaled to the old gamma's norm: every channel ||gamma_old|| / sqrt(C)
        level = float(old[k + ".weight"].double().norm()) / c**0.5
        assert not torch.allclose(old[k + ".weight"], torch.full((c,), level, dtype=torch.float32))
        assert torch.allclose(gamma.double(), torch.full((c,), level, dtype=torch.float64), rtol=1e-6)
        assert torch.count_nonzero(old[k + ".bias"]) > 0
        assert torch.equal(new[k + ".bias"], torch.zeros(c))  # the fresh beta is 0: stays 0
        assert torch.equal(new[k + ".running_mean"], torch.zeros(c))  # statistics: fresh, as `default`
        assert torch.equal(new[k + ".running_var"], torch.ones(c))
        assert int(new[k + ".num_batches_tracked"]) == 0


# ---------------------------------------------------------------------------------- shrink_perturb
@pytest.mark.parametrize(
    "init,shrink,perturb",
    [
        ("shrink_perturb", 0.4, 0.1),
        ("shrink-perturb:0.3,0.05", 0.3, 0.05),
        ("shrink_perturb:0.7,1", 0.7, 1.0),
    ],
)
def test_shrink_perturb_is_exactly_the_formula_on_the_default_draw(init, shrink, perturb):
    model = trained_tiny_cnn()
    modules = [model.fc, model.blocks[2]]
    old = [[p.detach().clone() for p in m.parameters()] for m in modules]
    fresh = draw_state(modules, 3, 1, "default")
    got = draw_state(modules, 3, 1, init)
    n = 0
    for (fp, fb), (gp, gb), op in zip(fresh, got, old):
        for f, g, o in zip(fp, gp, op):
            assert torch.equal(g, perturb * f + shrink * o)  # hand formula, same generator draw
            n += 1
        for f, g in zip(fb, gb):  # BN running statistics: the fresh ones (0 / 1 / 0), not shrunk
            assert torch.equal(g, f)
    assert n == 2 + 9  # fc weight, bias; 3 convs + 3 BN (weight, bias)


def test_shrink_perturb_extremes_are_warm_start_and_the_default_reinit():
    model = trained_tiny_cnn()
    modules = [model.fc, model.blocks[2]]
    old = [p.detach().clone() for m in modules for p in m.parameters()]
    keep = [p for params, _ in draw_state(modules, 0, 1, "shrink_perturb:1,0") for p in params]
    assert all(torch.equal(k, o) for k, o in zip(keep, old))  # lambda=1, sigma=0: unchanged
    fresh = draw_state(modules, 0, 1, "shrink_perturb:0,1")
    default = draw_state(modules, 0, 1, "default")
    for (fp, fb), (dp, db) in zip(fresh, default):  # lambda=0, sigma=1: exactly the default re-init
        assert all(torch.equal(a, b) for a, b in zip(fp + fb, dp + db))
    with torch.no_grad():  # a diverged head (inf/NaN) with lambda=0 still gets the finite fresh draw
        model.fc.weight[0, 0] = float("nan")
    assert torch.equal(
        draw_values([model.fc], 0, 1, "shrink_perturb:0,1")[0][0],
        draw_values([model.fc], 0, 1, "default")[0][0],
    )


def test_init_spellings_and_bad_parameters():
    assert canonical_init("norm-matched") == canonical_init("norm_matched") == "norm_matched"
    assert canonical_init("shrink-perturb") == canonical_init("shrink_perturb") == "shrink_perturb:0.4,0.1"
    assert canonical_init("shrink_perturb:0.5, 0") == "shrink_perturb:0.5,0.0"
    assert canonical_init("lecun-normal") == "lecun_normal"
    for bad in (
        "shrink_perturb:1.5,0.1",
        "shrink_perturb:0.4",
        "shrink_perturb:a,b",
        "shrink_perturb:0,0",
        "shrink_perturb:0.4,-1",
        "shrink_perturb:nan,0.1",
    ):
        with pytest.raises(ValueError, match="shrink_perturb:LAMBDA,SIGMA") as e:
            Rifle(nn.Sequential(nn.Linear(3, 2)), None, epochs=4, reinits=1, init=bad)
        assert repr(bad) in str(e.value)  # names the value given
    with pytest.raises(ValueError, match="unknown init 'norm_matched:2'.*norm_matched, shrink_perturb"):
        canonical_init("norm_matched:2")


def test_rifle_state_records_one_spelling_so_a_resume_may_use_the_other():
    def rifle(init):
        return Rifle(
            nn.Sequential(nn.Linear(6, 48), nn.ReLU(), trained_head()),
            None,
            epochs=8,
            reinits=2,
            init=init,
            min_steps_after=None,
        )

    first = rifle("shrink-perturb")
    with pytest.warns(UserWarning, match="not applied"):
        first.on_epoch_start(3)  # re-init 1 (epoch 2) passed without being applied; 2 pending
    state = first.state_dict()
    assert state["init"] == "shrink_perturb:0.4,0.1"
    rifle("shrink_perturb:0.4,0.1").load_state_dict(state)  # the same draws: resumes
    with pytest.raises(ValueError, match="init"):
        rifle("shrink_perturb:0.5,0.1").load_state_dict(state)  # other draws: refused


# ------------------------------------------------------------------ end to end through `rifle train`
# digits at 16 px, 15 % of train, 2 epochs of 3 steps: re-init 1 at the start of epoch 1
FAST = [
    "train",
    "--data",
    "digits",
    "--model",
    "tiny_cnn",
    "--image-size",
    "16",
    "--batch-size",
    "64",
    "--train-fraction",
    "0.15",
    "--min-steps-after",
    "0",
    "--lr",
    "0.05",
    "--quiet",
    "--epochs",
    "2",
    "--method",
    "rifle",
    "--reinits",
    "1",
]


@pytest.fixture
def reinit_spy(monkeypatch):
    """The real ``Rifle.reinit``, recording (index, old head, new head, the `default` draw, init)."""
    seen = []
    original = Rifle.reinit

    def spy(self, index):
        before = [p.detach().clone() for p in self.modules[0].parameters()]
        fresh = draw_state(self.modules, self.seed, index, "default")[0][0]
        original(self, index)
        seen.append(
            (index, before, [p.detach().clone() for p in self.modules[0].parameters()], fresh, self.init)
        )

    monkeypatch.setattr(Rifle, "reinit", spy)
    return seen


def run_and_capture(tmp_path, capsys, seen, init):
    """Run ``rifle train`` under :func:`reinit_spy` (``seen``): the head before and after, the default
    draw."""
    out = tmp_path / "run"
    code = main([*FAST, "--reinit-init", init, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert [i for i, *_ in seen] == [1]
    return out, seen[0][1:4]


def test_cli_norm_matched_head_keeps_the_trained_row_norms(tmp_path, capsys, reinit_spy):
    out, (before, after, fresh) = run_and_capture(tmp_path, capsys, reinit_spy, "norm-matched")
    (w0, b0), (w1, b1), (fw, _) = before, after, fresh
    assert torch.allclose(row_norms(w1), row_norms(w0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(cosines(w1, fw), torch.ones(w1.shape[0], dtype=torch.float64), atol=1e-6)
    assert float(b1.double().norm()) == pytest.approx(float(b0.double().norm()), rel=1e-6)
    assert not torch.allclose(w1, w0)
    # the run records the initialiser as given (a resume may use either spelling) and the one re-init
    assert yaml.safe_load((out / "config.yaml").read_text())["reinit_init"] == "norm-matched"
    s = json.loads((out / "summary.json").read_text())
    assert s["methods"]["rifle"]["init"] == "norm-matched" and s["complete"] is True
    assert s["reinit_epochs"] == [1] and s["reinit_epochs_seen"] == [1] and s["epochs_run"] == 2
    (d,) = s["rifle_diagnosis"]
    assert (d["index"], d["unit"], d["at"]) == (1, "epoch", 1)
    # the diagnosis' head norms are the spied heads' (‖W‖_F), equal since every row keeps its norm
    assert d["head_norm_before"] == pytest.approx(float(w0.double().norm()), rel=1e-6)
    assert d["head_norm_after"] == pytest.approx(float(w0.double().norm()), rel=1e-6)


def test_cli_shrink_perturb_head_is_the_formula(tmp_path, capsys, reinit_spy):
    out, (before, after, fresh) = run_and_capture(tmp_path, capsys, reinit_spy, "shrink-perturb:0.5,0.2")
    (w0, b0), (w1, b1), (fw, fb) = before, after, fresh
    assert torch.equal(w1, 0.2 * fw + 0.5 * w0)
    assert torch.equal(b1, 0.2 * fb + 0.5 * b0)
    assert not torch.equal(w1, w0)


def test_docs_variants_example_prints_what_it_says(capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "rifle.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    exec(compile("\n".join(blocks), str(doc), "exec"), {})
    lines = capsys.readouterr().out.split("\n")
    assert lines[3:6] == ["True", "True", "shrink_perturb:0.4,0.1"]
    text = doc.read_text()
    for cmd in ("--reinit-init norm-matched", "--reinit-init shrink-perturb:0.4,0.1"):
        assert cmd in text


# ------------------------------------------------------- the Lightning and HF callbacks pass init through
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_callback_passes_norm_matched_through(tmp_path, reinit_spy):
    pl = pytest.importorskip("lightning.pytorch")
    from sklearn.datasets import load_digits

    from rifle.integrations.lightning import RifleCallback

    d = load_digits()
    x, y = torch.tensor(d.data[:128], dtype=torch.float32) / 16, torch.tensor(d.target[:128])

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.fc(self.body(batch[0])), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    pl.seed_everything(0, verbose=False)
    pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[RifleCallback(reinits=1, init="norm-matched", min_steps_after=None)],
    ).fit(Net())
    [(index, (w0, _), (w1, _), (fw, _), init)] = reinit_spy
    assert (index, init) == (1, "norm_matched")
    assert torch.allclose(row_norms(w1), row_norms(w0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(cosines(w1, fw), torch.ones(10, dtype=torch.float64), atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hf_callback_passes_shrink_perturb_through(tmp_path, reinit_spy):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rifle.integrations.transformers import RifleTrainerCallback

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(5, 50, (32, 8), generator=torch.Generator().manual_seed(0))
    data = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": (i == 7).any().long()} for i in ids
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    cb = RifleTrainerCallback(reinits=1, init="shrink-perturb:0.5,0.2", min_steps_after=None)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    [(index, (w0, b0), (w1, b1), (fw, fb), init)] = reinit_spy
    assert (index, init) == (1, "shrink_perturb:0.5,0.2")
    assert torch.equal(w1, 0.2 * fw + 0.5 * w0) and torch.equal(b1, 0.2 * fb + 0.5 * b0)


def test_cli_resume_draws_the_norm_matched_head_of_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from rifle.train.checkpoint import WEIGHTS

    args = [*FAST, "--reinit-init", "norm-matched"]  # re-init 1 at the start of epoch 1
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    with interrupted_at_epoch(1):
        assert main([*args, "--out", str(tmp_path / "split")]) == 130
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    capsys.readouterr()
    full, split = load_file(str(tmp_path / "full" / WEIGHTS)), load_file(str(tmp_path / "split" / WEIGHTS))
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
