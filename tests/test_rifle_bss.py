"""RIFLE + BSS through the real trainer: the head carries the trainer's feature hook at each re-init."""

import json

from rifle.build import load_data
from rifle.config import TrainConfig
from rifle.run import run_train
from rifle.train.trainer import Trainer


def test_rifle_with_bss_reinits_without_copying_the_trainer(tmp_path, monkeypatch):
    def refuse(self, memo):
        raise AssertionError("a re-init deep-copied the Trainer (bound to the head's feature hook)")

    # the Trainer's _capture_features is a forward pre-hook on the head while BSS needs features
    monkeypatch.setattr(Trainer, "__deepcopy__", refuse, raising=False)
    cfg = TrainConfig(
        data="digits",
        model="tiny_cnn",
        method="rifle",
        reg="bss",
        reinits=1,
        epochs=2,
        image_size=16,
        batch_size=64,
        train_fraction=0.2,
        min_steps_after=0,
        out=str(tmp_path / "r"),
    ).validate()
    summary = run_train(cfg, data=load_data(cfg), log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [r["reinit"] for r in rows] == [False, True]  # K=1 of 2 epochs: at the start of epoch 1
    assert all(r["loss_bss"] > 0 for r in rows)
    assert summary["reinit_epochs_seen"] == [1]
