"""RifleTrainerCallback in a real transformers.Trainer: tiny random BERT / ViT, synthetic data, CPU."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import leave_group

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,  # noqa: E402
    TrainerCallback,
    TrainingArguments,
)

from rifle.core.reinit import draw_values  # noqa: E402
from rifle.core.schedule import RifleScheduleWarning  # noqa: E402
from rifle.integrations.transformers import RifleTrainerCallback, find_hf_head, hf_init  # noqa: E402

# most tests log every 100 steps on purpose (the diagnosis is not their subject): its warning is tested below
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:RifleTrainerCallback. the Trainer:RuntimeWarning"),
]
DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations" / "transformers.md"
N, BATCH, STEPS = 64, 8, 12  # 8 optimizer steps per epoch, 12 steps = 1.5 epochs


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


class Tokens(torch.utils.data.Dataset):
    """Label = whether token 7 occurs (learnable)."""

    def __init__(self, n=N, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 50, (n, length), generator=g)
        self.labels = (self.ids == 7).any(1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def targs(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def held(model, optimizer):
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    return {n for n, p in model.named_parameters() if opt.state.get(p)}


class Probe(TrainerCallback):
    """Weights and optimizer-state keys after each step and at the next step's begin."""

    def __init__(self):
        self.step_end, self.step_begin = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.step_end[state.global_step] = (snapshot(model), held(model, optimizer))

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.step_begin[state.global_step] = (snapshot(model), held(model, optimizer))


HEAD = {"classifier.weight", "classifier.bias"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run: 12 steps, re-inits at steps 4 and 8, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("hf_full")
    model = tiny_bert()
    cb, probe = RifleTrainerCallback(reinits=2, seed=4, min_steps_after=None), Probe()
    trainer = Trainer(model=model, args=targs(out), train_dataset=Tokens(), callbacks=[cb, probe])
    trainer.train()
    return out, snapshot(model), model, trainer, cb, probe


def test_step_reinit_at_the_right_steps_changes_only_the_head_and_clears_adam_state(full_run):
    _, _, model, trainer, cb, probe = full_run
    assert cb.rifle.reinit_steps == [4, 8] and cb.rifle.module_names == ["classifier"]
    # the Trainer's optimizer is Accelerate's wrapper; RIFLE works on the torch optimizer inside
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert type(cb.rifle.optimizer) is torch.optim.AdamW
    assert cb.fired == [(1, 4), (2, 8)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for g in range(1, STEPS):
        (before, held_before), (after, held_after) = probe.step_end[g], probe.step_begin[g]
        assert held_before == trainable  # AdamW moments exist for every parameter
        if g in (4, 8):
            assert changed(before, after) == HEAD
            assert held_after == trainable - HEAD
            w, b = draw_values([model.classifier], seed=4, index=1 if g == 4 else 2)[0]
            assert torch.equal(after["classifier.weight"], w) and torch.equal(after["classifier.bias"], b)
        else:
            assert changed(before, after) == set() and held_after == trainable


def reinit_logs(log_history):
    return [e for e in log_history if "rifle/reinit" in e]


def test_reinits_are_in_the_trainers_log_history(full_run):
    trainer = full_run[3]  # 8 steps per epoch: re-inits before optimizer steps 5 and 9
    assert reinit_logs(trainer.state.log_history) == [
        {"rifle/reinit": 1, "epoch": 0.5, "step": 4},
        {"rifle/reinit": 2, "epoch": 1.0, "step": 8},
    ]
    saved = json.loads((full_run[0] / "checkpoint-6" / "trainer_state.json").read_text())
    assert reinit_logs(saved["log_history"]) == [{"rifle/reinit": 1, "epoch": 0.5, "step": 4}]


@pytest.mark.parametrize(
    "ckpt, expected, restore_flag",
    [
        (4, [(1, 4), (2, 8)], False),  # saved after step 4; re-init 1 comes at step 4's begin: not skipped
        (6, [(2, 8)], False),  # between: re-init 1 must not repeat
        (6, [(2, 8)], True),  # the same with the Trainer's own callback restore
        (10, [], False),  # after the last re-init (and in the second epoch)
    ],
)
def test_resume_never_repeats_or_skips_and_matches_uninterrupted_run(
    full_run, tmp_path, ckpt, expected, restore_flag
):
    out, final = full_run[:2]
    path = out / f"checkpoint-{ckpt}"
    saved = json.loads((path / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["RifleTrainerCallback"]["attributes"]["progress"]["done"] == [
        i for i, p in [(1, 4), (2, 8)] if p < ckpt
    ]
    model = tiny_bert(seed=99)  # different initial weights: all must come from the checkpoint
    cb = RifleTrainerCallback(reinits=2, seed=4, min_steps_after=None)
    trainer = Trainer(
        model=model,
        args=targs(tmp_path, restore_callback_states_from_checkpoint=restore_flag),
        train_dataset=Tokens(),
        callbacks=[cb],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RifleScheduleWarning)  # no "re-init was not applied"
        trainer.train(resume_from_checkpoint=str(path))
    live = [c for c in trainer.callback_handler.callbacks if isinstance(c, RifleTrainerCallback)]
    assert len(live) == 1 and (live[0] is not cb) == restore_flag  # the flag swaps the instance
    assert live[0].fired == expected and live[0].rifle.state_dict()["done"] == [1, 2]
    # the checkpoint's log_history holds the re-inits before it, the resumed run adds the others
    logged = reinit_logs(trainer.state.log_history)
    assert [(e["rifle/reinit"], e["step"]) for e in logged] == [(1, 4), (2, 8)]
    resumed = snapshot(model)
    assert all(torch.equal(resumed[k], final[k]) for k in final), changed(resumed, final)


def test_resume_without_saved_state_warns(full_run, tmp_path):
    out = full_run[0]
    src = out / "checkpoint-6"
    dst = tmp_path / "checkpoint-6"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    state = json.loads((dst / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["RifleTrainerCallback"]
    (dst / "trainer_state.json").write_text(json.dumps(state))
    cb = RifleTrainerCallback(reinits=2, seed=4, min_steps_after=None)
    trainer = Trainer(
        model=tiny_bert(),
        args=targs(tmp_path / "o", save_strategy="no"),
        train_dataset=Tokens(),
        callbacks=[cb],
    )
    with pytest.warns(RifleScheduleWarning, match="step 4 was not applied"):
        trainer.train(resume_from_checkpoint=str(dst))
    assert cb.fired == [(2, 8)]


class Pixels(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, 1, 8, 8, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0.5).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
    )


def test_epoch_granularity_on_a_vit_image_classifier(tmp_path):
    model = tiny_vit()
    cb, probe = RifleTrainerCallback(reinits=2, granularity="epoch", seed=1, init="hf"), Probe()
    args = targs(tmp_path, max_steps=-1, num_train_epochs=3, save_strategy="no")
    with pytest.warns(RifleScheduleWarning, match="min_steps_after"):  # 4 steps per period
        trainer = Trainer(model=model, args=args, train_dataset=Pixels(), callbacks=[cb, probe])
        trainer.train()
    assert cb.rifle.reinit_epochs == [1, 2] and cb.fired == [(1, 1), (2, 2)]
    assert reinit_logs(trainer.state.log_history) == [
        {"rifle/reinit": 1, "epoch": 1.0, "step": 4},
        {"rifle/reinit": 2, "epoch": 2.0, "step": 8},
    ]
    for g in range(1, 12):  # 4 steps per epoch: epochs 1 and 2 begin at global steps 4 and 8
        before, after = probe.step_end[g][0], probe.step_begin[g][0]
        assert changed(before, after) == (HEAD if g in (4, 8) else set())
    w, b = draw_values([model.classifier], seed=1, index=2, init=hf_init(0.02))[0]
    after = probe.step_begin[8][0]
    assert torch.equal(after["classifier.weight"], w) and torch.equal(after["classifier.bias"], b)
    assert b.abs().max() == 0 and 0.01 < w.std() < 0.03  # HF's first init: N(0, 0.02), zero bias


def test_epoch_granularity_refuses_a_fractional_number_of_epochs(tmp_path):
    # 2.5 epochs of 4 steps = 10 steps: HF runs 10 steps but reports num_train_epochs=3; an epoch
    # schedule over 3 (or 2) epochs would put the re-inits at the wrong places
    cb = RifleTrainerCallback(reinits=1, granularity="epoch", min_steps_after=None)
    args = targs(tmp_path, max_steps=-1, num_train_epochs=2.5, save_strategy="no")
    trainer = Trainer(model=tiny_vit(), args=args, train_dataset=Pixels(), callbacks=[cb])
    with pytest.raises(ValueError, match=r"num_train_epochs=2\.5.*granularity='step'"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused before any step
    cb = RifleTrainerCallback(reinits=1, granularity="step", min_steps_after=None)  # the way out
    trainer = Trainer(model=tiny_vit(), args=args, train_dataset=Pixels(), callbacks=[cb])
    trainer.train()
    assert trainer.state.max_steps == 10 and cb.fired == [(1, 5)]


def test_epoch_granularity_warns_when_max_steps_ends_inside_an_epoch(tmp_path):
    cb = RifleTrainerCallback(reinits=1, granularity="epoch", min_steps_after=None)
    args = targs(tmp_path, max_steps=6, save_strategy="no")  # 4 steps per epoch: 1.5 epochs
    trainer = Trainer(model=tiny_vit(), args=args, train_dataset=Pixels(), callbacks=[cb])
    with pytest.warns(RifleScheduleWarning, match=r"max_steps=6 ends training inside epoch 1"):
        trainer.train()
    assert cb.rifle.reinit_epochs == [1] and cb.fired == [(1, 1)]
    cb = RifleTrainerCallback(reinits=1, granularity="epoch", min_steps_after=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RifleScheduleWarning)  # 8 steps = exactly 2 epochs: silent
        Trainer(
            model=tiny_vit(),
            args=targs(tmp_path, max_steps=8, save_strategy="no"),
            train_dataset=Pixels(),
            callbacks=[cb],
        ).train()
    assert cb.fired == [(1, 1)]


def test_epoch_granularity_refuses_a_dataset_without_length(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(Pixels()[i] for i in range(32))

    cb = RifleTrainerCallback(reinits=1, granularity="epoch", min_steps_after=None)
    trainer = Trainer(
        model=tiny_vit(),
        args=targs(tmp_path, max_steps=8, save_strategy="no"),
        train_dataset=Stream(),
        callbacks=[cb],
    )
    with pytest.raises(ValueError, match="IterableDataset.*granularity='step'"):
        trainer.train()


def test_head_discovery_for_hf_classifiers():
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    small = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=50,
        max_position_embeddings=20,
        num_labels=3,
    )
    bert = tiny_bert()
    assert find_hf_head(bert) == [bert.classifier]
    roberta = RobertaForSequenceClassification(RobertaConfig(**small))
    assert find_hf_head(roberta) == [roberta.classifier.out_proj]  # the final projection
    assert find_hf_head(roberta, "classifier.dense") == [roberta.classifier.dense]
    assert find_hf_head(roberta, ["classifier.dense", "classifier.out_proj"]) == [
        roberta.classifier.dense,
        roberta.classifier.out_proj,
    ]
    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=20, num_labels=3)
    )
    assert find_hf_head(gpt2) == [gpt2.score]
    vit = tiny_vit()
    assert find_hf_head(vit) == [vit.classifier]
    with pytest.raises(ValueError, match="no such submodule"):
        find_hf_head(bert, "classifer")


def test_state_is_json_and_rebuilds_the_callback():
    cb = RifleTrainerCallback(reinits=2, head=["classifier"], seed=3, init="hf")
    state = json.loads(json.dumps(cb.state()))
    again = RifleTrainerCallback.from_state(state)
    assert again.state() == cb.state()
    odd = RifleTrainerCallback(init=lambda m: None).state()
    with pytest.raises(ValueError, match="callable init"):
        RifleTrainerCallback(**odd["args"])
    with pytest.raises(ValueError, match="granularity"):
        RifleTrainerCallback(granularity="batch")


def test_doc_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("\n".join(blocks), str(DOC), "exec"), ns)
    assert not [w for w in caught if "RifleTrainerCallback: the Trainer" in str(w.message)]
    assert ns["rifle_cb"].fired == [(1, 4), (2, 8)]
    # its logging_steps feeds the diagnosis the loss before both re-inits
    assert [d["train_loss_before"] is not None for d in ns["rifle_cb"].diagnosis] == [True, True]
    report = ns["trigger_cb"].trigger_report  # the converged-trigger example: what its comments say
    assert [round(a, 2) for _, a in report["train_acc"]] == [0.91, 0.66, 0.92, 0.53, 0.91, 0.92]
    assert ns["trigger_cb"].fired == [(1, 1), (2, 3)]


@pytest.mark.parametrize(
    "granularity,kw,missed",
    [
        ("step", dict(logging_steps=100), "step(s) [4, 8]"),  # the Trainer's default is 500
        ("step", dict(logging_steps=5), "step(s) [4]"),  # first log at 5, after the re-init at 4
        ("step", dict(logging_strategy="no"), "step(s) [4, 8]"),
        ("step", dict(logging_steps=4), None),
        ("epoch", dict(logging_steps=9, max_steps=-1, num_train_epochs=4), "epoch(s) [1]"),  # 8 steps/epoch
        ("epoch", dict(logging_strategy="epoch", max_steps=-1, num_train_epochs=4), None),
    ],
)
def test_sparse_logging_warns_once_naming_the_reinits_it_leaves_unmeasured(tmp_path, granularity, kw, missed):
    """The schedule trigger's diagnosis reads the training loss from the Trainer's logs (on_log): a log
    must fall in the loss window (an epoch's steps: 12 // 2 = 6 with max_steps=12) before each re-init."""
    cb = RifleTrainerCallback(reinits=2, seed=0, min_steps_after=None, granularity=granularity)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(
            model=tiny_bert(),
            args=targs(tmp_path, save_strategy="no", **kw),
            train_dataset=Tokens(),
            callbacks=[cb],
        ).train()
    ours = [str(w.message) for w in caught if "RifleTrainerCallback: the Trainer" in str(w.message)]
    unmeasured = [p for p, d in zip(cb.rifle.points, cb.diagnosis) if d["train_loss_before"] is None]
    assert len(cb.diagnosis) == 2
    if missed is None:
        assert ours == [] and unmeasured == []
        return
    assert len(ours) == 1, ours
    assert f"before the re-init(s) at {missed}:" in ours[0] and "head convergence not measured" in ours[0]
    assert f"logging_steps=...) to at most {4 if granularity == 'step' else 8}" in ours[0]
    assert f"{granularity}(s) {unmeasured}" == missed  # what it predicted is what happened
    verdicts = [d["verdict"] for d in cb.diagnosis if d["train_loss_before"] is None]
    assert all("head convergence not measured" in v for v in verdicts)


def test_converged_trigger_needs_no_logs(tmp_path):
    cb = RifleTrainerCallback(reinits=1, trigger="converged", converged_acc=0.5, min_steps_after=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(
            model=tiny_bert(),
            args=targs(tmp_path, save_strategy="no", max_steps=-1, num_train_epochs=2, logging_strategy="no"),
            train_dataset=Tokens(),
            callbacks=[cb],
        ).train()
    assert not [w for w in caught if "RifleTrainerCallback: the Trainer" in str(w.message)]


# ---------------------------------------------------------------------------- trigger="converged"
class Counting:
    """The test's own count of each epoch's training accuracy: a forward hook like the callback's."""

    def __init__(self, model, steps_per_epoch):
        self.seen, self.calls, self.spe = {}, 0, steps_per_epoch
        model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        if module.training:
            epoch = self.calls // self.spe  # micro-batches per epoch
            self.calls += 1
            c, n = self.seen.get(epoch, (0, 0))
            self.seen[epoch] = (
                c + int((output.logits.argmax(-1) == kwargs["labels"]).sum()),
                n + len(kwargs["labels"]),
            )

    def accs(self):
        return [self.seen[e][0] / self.seen[e][1] for e in sorted(self.seen)]


def converged_args(out, **kw):
    return targs(out, **{"max_steps": -1, "num_train_epochs": 6, "save_strategy": "no", **kw})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_converged_trigger_fires_at_the_first_epoch_after_the_train_accuracy_reached_it(tmp_path, accumulate):
    model, probe = tiny_bert(), Probe()
    count = Counting(model, N // BATCH)
    cb = RifleTrainerCallback(reinits=2, seed=4, min_steps_after=None, trigger="converged", converged_acc=0.9)
    assert cb.granularity == "epoch"  # the converged trigger decides per epoch
    trainer = Trainer(
        model=model,
        args=converged_args(tmp_path, gradient_accumulation_steps=accumulate),
        train_dataset=Tokens(),
        callbacks=[cb, probe],
    )
    trainer.train()
    accs = count.accs()  # 8 micro-batches of 8 per epoch, 8 / accumulate optimizer steps
    assert len(accs) == 6 and [a for _, a in cb.trigger_report["train_acc"]] == accs
    fire = next(e + 1 for e, a in enumerate(accs) if a >= 0.9)
    assert cb.fired[0] == (1, fire) and [e for _, e in cb.fired] == cb.trigger_report["fired"]
    spe = 8 // accumulate
    for g in range(1, 6 * spe):  # the head moved exactly at the fired epochs' first steps
        assert changed(probe.step_end[g][0], probe.step_begin[g][0]) == (
            HEAD if g in [e * spe for e in cb.trigger_report["fired"]] else set()
        ), g
    w, b = draw_values([model.classifier], seed=4, index=1)[0]
    after = probe.step_begin[fire * spe][0]
    assert torch.equal(after["classifier.weight"], w) and torch.equal(after["classifier.bias"], b)
    assert cb.diagnosis[0]["train_acc_before"] == pytest.approx(accs[fire - 1])
    assert reinit_logs(trainer.state.log_history)[0]["rifle/reinit"] == 1


def test_converged_trigger_that_never_converges_does_not_fire_and_says_why(tmp_path, capsys):
    model = tiny_bert()
    count = Counting(model, N // BATCH)
    cb = RifleTrainerCallback(reinits=1, min_steps_after=None, trigger="converged", converged_acc=1.0)
    w = model.classifier.weight.detach().clone()
    Trainer(
        model=model,
        args=converged_args(tmp_path, num_train_epochs=3, learning_rate=0.0),
        train_dataset=Tokens(),
        callbacks=[cb],
    ).train()
    accs = count.accs()
    best = max(range(3), key=lambda e: (accs[e], -e))
    reason = f"train accuracy never reached 1 (best {accs[best]:.2f} at epoch {best})"
    assert cb.fired == [] and cb.diagnosis == [] and torch.equal(model.classifier.weight, w)
    assert cb.trigger_report["reason"] == reason
    assert f"RIFLE trigger: no re-init: {reason} (docs/rifle.md#trigger)" in capsys.readouterr().out


def test_converged_trigger_needs_labels_and_logits(tmp_path):
    cb = RifleTrainerCallback(reinits=1, min_steps_after=None, trigger="converged")
    args = converged_args(tmp_path, label_smoothing_factor=0.1)  # the Trainer pops the labels
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(), callbacks=[cb])
    with pytest.raises(
        ValueError,
        match=r"must be called with labels=.*label_smoothing_factor > 0.*"
        r"got labels=absent",
    ):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match="trigger='converged' decides once per epoch.*granularity='epoch'"):
        RifleTrainerCallback(trigger="converged", granularity="step")
    with pytest.raises(ValueError, match="trigger='often'"):
        RifleTrainerCallback(trigger="often")


class SaveAt(TrainerCallback):
    """Checkpoint after these optimizer steps only (before the RIFLE callback in the list: it sees the
    Trainer's decision to save in on_step_end)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kw):
        if state.global_step in self.steps:
            control.should_save = True


@pytest.fixture(scope="module")
def converged_full(tmp_path_factory):
    """5 epochs of 8 steps; the head converges at epoch 1 (re-init at 2) and 3 (re-init at 4)."""
    out = tmp_path_factory.mktemp("hf_converged")
    model = tiny_bert()
    cb = RifleTrainerCallback(reinits=2, seed=4, min_steps_after=None, trigger="converged", converged_acc=0.9)
    Trainer(
        model=model,
        args=converged_args(out, num_train_epochs=5),
        train_dataset=Tokens(),
        callbacks=[SaveAt([12, 16, 20]), cb],
    ).train()
    return out, snapshot(model), cb


@pytest.mark.parametrize(
    "restore_flag, steps", [(False, (12, 16, 20)), pytest.param(True, (16,), marks=pytest.mark.slow)]
)
def test_converged_trigger_resumes_with_the_same_decisions(converged_full, tmp_path, restore_flag, steps):
    out, final, full = converged_full
    assert full.fired == [(1, 2), (2, 4)]
    # mid-epoch 1 (the open window of the epoch that reached the threshold), its last step (window
    # still open: settled at on_epoch_end), mid-epoch 2 right after the re-init
    for step in steps:
        model = tiny_bert(seed=99)
        cb = RifleTrainerCallback(
            reinits=2, seed=4, min_steps_after=None, trigger="converged", converged_acc=0.9
        )
        trainer = Trainer(
            model=model,
            args=converged_args(
                tmp_path, num_train_epochs=5, restore_callback_states_from_checkpoint=restore_flag
            ),
            train_dataset=Tokens(),
            callbacks=[cb],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RifleScheduleWarning)
            trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
        [live] = [c for c in trainer.callback_handler.callbacks if isinstance(c, RifleTrainerCallback)]
        assert (live is not cb) == restore_flag and live.trigger == "converged"
        assert live.trigger_report == full.trigger_report, step
        assert live.rifle.applied == [1, 2] and live.diagnosis == full.diagnosis, step
        resumed = snapshot(model)
        assert all(torch.equal(resumed[k], final[k]) for k in final), (step, changed(resumed, final))


# ---------------------------------------------------------------------------- logging (issue 14)
class Received(TrainerCallback):
    """What a report_to integration receives: every on_log call's logs (listed before RIFLE's, as
    the Trainer puts the integrations before user callbacks)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append((state.global_step, dict(logs)))


def test_reinits_and_diagnosis_reach_the_report_to_integrations(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    received = Received()
    cb = RifleTrainerCallback(reinits=1, seed=4, min_steps_after=None)  # 12 steps: re-init at step 6
    args = targs(
        tmp_path,
        save_strategy="no",
        report_to=["tensorboard"],  # writes under output_dir/runs
        logging_steps=2,
    )  # the loss the diagnosis is fed
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Tokens(), callbacks=[received, cb])
    trainer.train()
    [d] = cb.diagnosis
    assert (d["at"], d["steps_after"]) == (6, 5)
    # the Trainer's log_history: as before, plus the new numbers
    assert reinit_logs(trainer.state.log_history) == [{"rifle/reinit": 1, "epoch": 0.75, "step": 6}]
    [h] = [h for h in trainer.state.log_history if "rifle/diagnosis_of" in h]
    assert h["step"] == 11 and h["rifle/verdict"] == d["verdict"] and h["rifle/grad_ratio"] == d["grad_ratio"]
    assert [h[f"rifle/grad_ratio_{t}"] for t in ("first", "middle", "last")] == d["grad_ratio_thirds"]
    # every callback's on_log got them (numbers only), so do TensorBoard, W&B, ...
    got = {step: logs for step, logs in received.logs if any(k.startswith("rifle/") for k in logs)}
    assert got[6] == {"rifle/reinit": 1, "epoch": 0.75}
    assert got[11]["rifle/grad_ratio"] == d["grad_ratio"] and "rifle/verdict" not in got[11]
    assert all(isinstance(v, (int, float)) for v in got[11].values())
    # ... and what the real TensorBoard callback wrote
    [events] = list((tmp_path / "runs").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert scalars["train/rifle/reinit"] == [(6, 1.0)]
    for key in ("grad_ratio", "train_loss_before", "head_norm_before", "head_norm_after", "grad_ratio_last"):
        [(step, value)] = scalars[f"train/rifle/{key}"]
        assert step == 11 and value == pytest.approx(h[f"rifle/{key}"], rel=1e-6), key


# ---------------------------------------------------------------------------- DDP (2 gloo ranks)
def _ddp_worker(rank, port, tmp, resume):
    import json
    from test_ddp import _env

    _env(rank, 2, port)
    model = tiny_bert()
    count = Counting(model, 4)  # per rank and epoch: 32 examples, 4 steps of 8
    cb = RifleTrainerCallback(reinits=1, seed=4, min_steps_after=None, trigger="converged", converged_acc=0.9)
    trainer = Trainer(
        model=model,
        args=converged_args(tmp, num_train_epochs=4),
        train_dataset=Tokens(),
        callbacks=[cb] if resume else [SaveAt([6]), cb],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    assert torch.distributed.get_world_size() == 2
    with open(f"{tmp}/{'resumed' if resume else 'full'}{rank}.json", "w") as f:
        json.dump(
            {
                "seen": count.seen,
                "report": cb.trigger_report,
                "diagnosis": cb.diagnosis,
                "head": model.classifier.weight.tolist(),
            },
            f,
        )
    leave_group()


@pytest.mark.slow
@pytest.mark.extended
def test_ddp_ranks_decide_from_the_summed_accuracy_and_resume_mid_epoch_exactly(tmp_path):
    """2 gloo ranks under the HF Trainer: both fire where the accuracy summed over ranks first reaches
    the threshold; a checkpoint in the middle of an epoch holds both ranks' sums, and the resumed run
    (the Trainer skips the batches seen) ends with the uninterrupted run's decisions and head."""
    import json
    import torch.multiprocessing as mp
    from test_ddp import free_port

    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path), None), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"full{r}.json").read_text()) for r in (0, 1))
    assert r0["report"] == r1["report"] and r0["head"] == r1["head"] and r0["seen"] != r1["seen"]
    summed = [(r0["seen"][str(e)][0] + r1["seen"][str(e)][0]) / 64 for e in range(4)]
    assert [a for _, a in r0["report"]["train_acc"]] == summed
    fire = next(e + 1 for e, a in enumerate(summed) if a >= 0.9)
    assert r0["report"]["fired"] == [fire], summed
    # step 6 = 2 of epoch 1's 4 steps: 2 steps x 8 examples x 2 ranks in the saved window
    saved = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    window = saved["stateful_callbacks"]["RifleTrainerCallback"]["attributes"]["progress"]["trigger_window"]
    assert window["epoch"] == 1 and window["count"] == 32
    mp.spawn(
        _ddp_worker, args=(free_port(), str(tmp_path), str(tmp_path / "checkpoint-6")), nprocs=2, join=True
    )
    s0, s1 = (json.loads((tmp_path / f"resumed{r}.json").read_text()) for r in (0, 1))
    assert s0["report"] == s1["report"] == r0["report"] and s0["head"] == r0["head"]
    assert s0["diagnosis"] == r0["diagnosis"]
