"""--pretrained-file (safetensors / weights-only torch files) and the immediate offline error.

Nothing here downloads: the files are saved from models built with pretrained=False, and the offline
tests point the hub at a closed local port or set HF_HUB_OFFLINE=1, with empty caches.
"""

import hashlib
import json
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import interrupted_at_epoch, run_cli
from rifle.config import ConfigError, TrainConfig
from rifle.models import ModelError, create_model, reachable
from rifle.train import Trainer

SEED = 1234


def resnet18_state(num_classes=1000):
    import timm

    torch.manual_seed(SEED)
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes).state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    state = resnet18_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "resnet18.safetensors"))
    # a training checkpoint as many scripts write it: wrapped, with DDP's module. prefix
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, d / "resnet18.pt")
    return d, state


def backbone_equal(model, state):
    own = model.state_dict()
    keys = [k for k in own if not k.startswith("fc.")]
    return len(keys) == len(state) - 2 and all(torch.equal(own[k], state[k]) for k in keys)


@pytest.mark.parametrize("name", ["resnet18.safetensors", "resnet18.pt"])
def test_backbone_is_the_files_and_the_head_is_drawn_as_without_it(files, name):
    d, state = files
    logs = []
    torch.manual_seed(7)
    model = create_model("resnet18", 5, pretrained_file=d / name, log=logs.append)
    assert backbone_equal(model, state)
    torch.manual_seed(7)
    fresh = create_model("resnet18", 5, pretrained=False)
    assert model.fc.weight.shape == (5, 512) and torch.equal(model.fc.weight, fresh.fc.weight)
    assert model.rifle_pretrained_source == f"file {d / name}"
    where = "safetensors" if name.endswith("safetensors") else "torch file, ['state_dict']"
    assert logs == [
        f"pretrained weights: 120 tensors from {d / name} ({where}) into the backbone; its "
        f"classifier (fc.bias, fc.weight) is not loaded: the run trains a new head"
    ]


def test_a_torchvision_file_loads_into_torchvision_and_timm_resnet18(tmp_path):
    import torchvision

    torch.manual_seed(SEED)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "tv.pth")
    for name in ("torchvision:resnet18", "resnet18"):  # timm's ResNet uses torchvision's names
        assert backbone_equal(create_model(name, 3, pretrained_file=tmp_path / "tv.pth"), state), name


def test_cli_finetunes_from_the_file_and_epoch_0_starts_from_it(files, tmp_path, capsys, monkeypatch):
    d, state = files
    seen = {}
    original = Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == 0:
            seen["start"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        [
            "train",
            "--data",
            "digits",
            "--model",
            "resnet18",
            "--pretrained-file",
            d / "resnet18.safetensors",
            "--epochs",
            "1",
            "--image-size",
            "16",
            "--batch-size",
            "64",
            "--train-fraction",
            "0.1",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    assert f"pretrained weights: 120 tensors from {d / 'resnet18.safetensors'}" in stdout
    start = seen["start"]
    assert all(torch.equal(start[k], state[k]) for k in start if not k.startswith("fc."))
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrained_source"] == f"file {d / 'resnet18.safetensors'}"


# ---------------------------------------------------------------------------------------- bad files
def test_bad_files_are_errors_naming_the_file(files, tmp_path):
    d, state = files
    cases = {}
    cases["missing"] = (tmp_path / "nope.safetensors", "--pretrained-file .*nope.safetensors: no such file")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x07" * 64)
    cases["junk"] = (junk, "junk.bin: neither a safetensors file nor a torch file, or corrupt")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((d / "resnet18.pt").read_bytes()[:5000])
    cases["truncated"] = (truncated, "cut.pt: not a readable torch file")
    pickled = tmp_path / "object.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module, not a state dict
    cases["object"] = (pickled, r"object.pt: torch.load\(weights_only=True\) refused it")
    bad_safe = tmp_path / "bad.safetensors"
    bad_safe.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    cases["bad safetensors"] = (bad_safe, "bad.safetensors: neither a safetensors file nor a torch file")
    for path, match in cases.values():
        with pytest.raises(ModelError, match=match):
            create_model("resnet18", 3, pretrained_file=path)


def test_a_file_of_another_architecture_lists_the_tensors(tmp_path):
    import timm

    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), str(tmp_path / "r34.safetensors"))
    with pytest.raises(
        ModelError,
        match=r"r34.safetensors does not match resnet18: 80 tensors of the file are "
        r"not in the model: layer1.2.bn1.bias, ",
    ):
        create_model("resnet18", 3, pretrained_file=tmp_path / "r34.safetensors")
    save_file(create_model("tiny_cnn", 3, pretrained=False).state_dict(), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(
        ModelError,
        match=r"none of the file's 54 tensor names is one of resnet18's \(file: blocks.0.bn1.bias, ",
    ):
        create_model("resnet18", 3, pretrained_file=tmp_path / "tiny.safetensors")
    state = resnet18_state()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(
        ModelError,
        match=r"1 have other shapes: layer1.0.conv1.weight \(64, 64, 1, 1\) in the "
        r"file, \(64, 64, 3, 3\) in the model",
    ):
        create_model("resnet18", 3, pretrained_file=tmp_path / "shape.safetensors")
    del state["layer1.0.conv1.weight"]
    state.pop("layer4.1.bn2.running_var")
    save_file(state, str(tmp_path / "few.safetensors"))
    with pytest.raises(ModelError, match="2 of the model's 120 backbone tensors are not in the file"):
        create_model("resnet18", 3, pretrained_file=tmp_path / "few.safetensors")


def test_no_pretrained_with_a_file_is_a_contradiction():
    with pytest.raises(ConfigError, match="--pretrained-file='w.pt': contradicts --no-pretrained"):
        TrainConfig(pretrained=False, pretrained_file="w.pt").validate()


# ------------------------------------------------------------------------------------------ offline
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: connections are refused at once


def test_reachable_is_quick_and_right():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert reachable(f"http://127.0.0.1:{server.getsockname()[1]}/x")[0]
    port = closed_port()
    t0 = time.perf_counter()
    assert reachable(f"http://127.0.0.1:{port}/x") == (False, f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 3.5


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(var, raising=False)
    port = closed_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")  # what HF_ENDPOINT sets
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return port


def test_unreachable_hub_fails_at_once_with_what_to_do(unreachable_hub, tmp_path, capsys):
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        create_model("resnet18", 3)
    assert time.perf_counter() - t0 < 5  # timm's retries took 53 s here
    msg = str(e.value)
    assert f"127.0.0.1:{unreachable_hub} cannot be reached" in msg and "timm/resnet18.a1_in1k" in msg
    assert "--pretrained-file PATH" in msg and "--no-pretrained" in msg
    code, _, err = run_cli(
        [
            "train",
            "--data",
            "digits",
            "--model",
            "resnet18",
            "--epochs",
            "1",
            "--image-size",
            "16",
            "--out",
            tmp_path / "run",
        ],
        capsys,
    )
    assert code == 2 and "--pretrained-file PATH" in err and "cannot be reached" in err


def test_hf_hub_offline_fails_at_once_for_timm_and_torchvision(unreachable_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("resnet18", "torchvision:resnet18"):
        t0 = time.perf_counter()
        with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1 is set, and they are not in the local cache"):
            create_model(name, 3)
        assert time.perf_counter() - t0 < 5, name


def test_a_file_needs_no_network(files, unreachable_hub):
    d, state = files
    assert backbone_equal(create_model("resnet18", 3, pretrained_file=d / "resnet18.safetensors"), state)


# ------------------------------------------------------------------------------------------- resume
def tiny_file(path, seed):
    torch.manual_seed(seed)
    save_file(create_model("tiny_cnn", 10, pretrained=False).state_dict(), str(path))
    return path


def tiny_run(out, weights, *extra):
    return [
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
        "0.2",
        "--epochs",
        "2",
        "--pretrained-file",
        weights,
        "--out",
        out,
        "--quiet",
        *extra,
    ]


def interrupted_run(argv, capsys):
    with interrupted_at_epoch(1):
        assert run_cli(argv, capsys)[0] == 130  # as Ctrl-C: the checkpoint of epoch 0 is kept


def l2sp_losses(out):
    return [json.loads(line)["loss_l2sp"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_another_pretrained_file_is_refused(tmp_path, capsys):
    """L2-SP's reference is the pretrained file: a resume with other bytes under its name took them as the
    reference (epoch-1 loss_l2sp 5e-6 -> 3.8) before the run recorded the file's SHA-256."""
    weights, out = tiny_file(tmp_path / "w.safetensors", 1), tmp_path / "run"
    argv = tiny_run(out, weights, "--reg", "l2sp")
    interrupted_run(argv, capsys)
    original = weights.read_bytes()
    tiny_file(weights, 2)
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 2 and f"--pretrained-file {weights} is not the file the run started from" in err, err
    record = json.loads((out / "pretrained_file.json").read_text())
    assert record == {"path": str(weights), "sha256": hashlib.sha256(original).hexdigest()}
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in err and record["sha256"] in err
    assert "l2sp would silently take it as the reference" in err and len(l2sp_losses(out)) == 1
    weights.write_bytes(original)  # the original back: the resume goes on from the recorded reference
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    first, second = l2sp_losses(out)
    assert first < 1e-3 and second < 1e-3, (first, second)


def test_a_moved_file_blocks_only_a_resume_that_reads_it(tmp_path, capsys):
    weights = tiny_file(tmp_path / "w.safetensors", 1)
    moved = tmp_path / "elsewhere.safetensors"
    for extra, needed in (((), False), (("--reg", "l2sp"), True)):
        out = tmp_path / f"run-{needed}"
        argv = tiny_run(out, weights, *extra)
        interrupted_run(argv, capsys)
        weights.rename(moved)
        code, stdout, err = run_cli(["train", "--out", out, "--resume"], capsys)  # the recorded path
        if needed:
            assert code == 2, err
            assert (
                f"l2sp uses the pretrained weights as a reference, but there is no file at {weights} "
                f"(where --pretrained-file points)"
            ) in err, err
            # its new place, with the same bytes, is no change of setting
            code, _, err = run_cli([*tiny_run(out, moved, *extra), "--resume"], capsys)
            assert code == 0, err
            assert max(l2sp_losses(out)) < 1e-3
            assert json.loads((out / "pretrained_file.json").read_text())["path"] == str(moved)
        else:  # plain fine-tuning: every weight comes from the checkpoint
            assert code == 0, err
            assert f"--pretrained-file {weights} is not there; not needed to resume" in stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["complete"] and summary["epochs_run"] == 2
        assert summary["pretrained_source"] == f"file {moved if needed else weights}"
        moved.rename(weights)
        if needed:  # the record holds the new place, now empty; a complete run has nothing left to read it
            code, stdout, err = run_cli(["train", "--out", out, "--resume"], capsys)
            assert code == 0 and "run already complete; nothing to do" in stdout, err


def test_analysis_refuses_a_reference_from_a_changed_pretrained_file(tmp_path, capsys):
    """`rifle analyze` rebuilds the run's starting model from --pretrained-file: other bytes under that name
    would silently make it another model (it did before the check), so it is refused, naming both hashes."""
    from rifle.analysis.runs import ReferenceError, load_run_model, run_depth

    weights, out = tiny_file(tmp_path / "w.safetensors", 1), tmp_path / "run"
    code, _, err = run_cli(tiny_run(out, weights), capsys)
    assert code == 0, err
    load_run_model(out, pretrained=True)  # the recorded file: accepted
    assert run_depth(out, write=False)
    original = hashlib.sha256(weights.read_bytes()).hexdigest()
    tiny_file(weights, 2)
    changed = hashlib.sha256(weights.read_bytes()).hexdigest()
    for call in (lambda: load_run_model(out, pretrained=True), lambda: run_depth(out, write=False)):
        with pytest.raises(ReferenceError, match="is not the file the run started from") as e:
            call()
        assert original in str(e.value) and changed in str(e.value)
    weights.unlink()
    with pytest.raises(ReferenceError, match="there is no file there"):
        run_depth(out, write=False)
