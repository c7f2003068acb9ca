"""The training loop: forward, loss + method terms, step, evaluation, checkpoint - and nothing else.

It knows no method by name: every method is called through the hooks of
:class:`rifle.methods.base.Method`. Every random stream of an epoch (data order, augmentation,
dropout) is derived from (seed, epoch), so a run resumed at an epoch boundary reproduces the
uninterrupted run exactly on CPU (REFERENCE.md §3.12).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.structure import find_head, head_names
from ..core.seeding import derive_seed
from ..core.replicas import gather_over_ranks, verify_replicas
from ..data import DataBundle, eval_batches, num_batches, samples_per_rank, train_batches
from ..methods.base import Method, RunContext
from ..data.cache import last_batch_dropped
from ..data.prefetch import prefetch
from .checkpoint import defer_signals, first_non_finite, load_checkpoint, non_finite_error, save_checkpoint
from .distributed import DistInfo, all_sum, barrier, broadcast_object
from .optim import build_optimizer, split_by_layer
from .loggers import StepLines
from .outputs import RunDir


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


def _progress(iterable, total: int, desc: str, enabled: bool, leave: bool = False):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        data: DataBundle,
        methods: Sequence[Method],
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float,
        weight_decay: float,
        lr_schedule: str,
        image_size: int,
        seed: int,
        preprocessing: dict[str, Any],
        opt: str = "sgd",
        opt_eps: float | None = None,
        opt_betas: Sequence[float] | None = None,
        layer_decay: float | None = None,
        run_dir: RunDir,
        device: torch.device,
        channels_last: bool = True,
        eval_batch_size: int = 256,
        eval_test: str = "needed",
        head: str | None = None,
        checkpoint_meta: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        amp: str = "none",
        compile: bool = False,
        grad_accum: int = 1,
        workers: int = 0,
        dist: DistInfo | None = None,
        log: Callable[[str], None] = print,
        progress: bool | None = None,
        log_interval: int = 50,
    ) -> None:
        self.dist = dist or DistInfo()
        self.model = model.to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if batch_size % (self.dist.world_size * grad_accum):
            raise ValueError(
                f"--batch-size {batch_size} must be divisible by world size "
                f"{self.dist.world_size} x --grad-accum {grad_accum}"
            )
        self.local_batch = batch_size // self.dist.world_size  # --batch-size is the global batch
        self.grad_accum = grad_accum
        self.workers = workers
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.data, self.methods = data, list(methods)
        self.epochs, self.batch_size, self.image_size, self.seed = epochs, batch_size, image_size, seed
        self.mean, self.std = preprocessing["mean"], preprocessing["std"]
        self.run_dir, self.device, self.channels_last = run_dir, device, channels_last
        self.eval_batch_size = eval_batch_size
        if eval_test not in ("needed", "every"):
            raise ValueError(f"eval_test must be 'needed' or 'every', got {eval_test!r}")
        self.eval_test = eval_test
        self.meta = checkpoint_meta or {}
        self.log = log if self.dist.is_main else (lambda s: None)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dist.is_main
        # no bars because stderr is no terminal (batch jobs): step lines instead (timm's --log-interval)
        self.step_lines = (
            StepLines(
                log_interval,
                epochs,
                0,
                lambda s: print(s, file=sys.stderr, flush=True),
                world_size=self.dist.world_size,
            )
            if progress is None and not self.progress and self.dist.is_main and log_interval
            else None
        )
        if len(data.train) == 0:
            raise ValueError("the training split is empty")
        n_rank = samples_per_rank(len(data.train), self.dist.world_size)
        # a last micro-batch of one image crashes BatchNorm: drop that batch (and only that one)
        self.drop_last = last_batch_dropped(n_rank, self.local_batch, grad_accum)
        self.steps_per_epoch = num_batches(n_rank, self.local_batch, drop_last=self.drop_last)
        per_rank = f", {n_rank} per rank" if self.dist.enabled else ""
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split is too small: {len(data.train)} training image"
                f"{'s' if len(data.train) != 1 else ''}{per_rank} make only micro-batches of "
                f"one image (--batch-size {batch_size}, --grad-accum {grad_accum}), which "
                f"BatchNorm cannot train on; use more training images"
            )
        if self.drop_last:
            left = n_rank % self.local_batch
            self.log(
                f"note: {len(data.train)} training images{per_rank} in batches of {self.local_batch}"
                + (f" (--grad-accum {grad_accum})" if grad_accum > 1 else "")
                + f" leave a last batch that would train on a single image, which BatchNorm cannot; "
                f"it is dropped every epoch ({left} image{'s' if left != 1 else ''}"
                f"{' per rank' if self.dist.enabled else ''}, a different one each epoch)"
            )

        self.head = find_head(self.model, head.split(",") if head else None)
        self.head_names = head_names(self.model, self.head)
        # the model's weights before any training (L2-SP / DELTA reference, analysis)
        self.pretrained_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

        self.ctx = RunContext(
            epochs=epochs,
            steps_per_epoch=self.steps_per_epoch,
            seed=seed,
            num_classes=data.num_classes,
            head=self.head,
            head_names=self.head_names,
            device=device,
            train_loader=lambda: self._train_iter(0),
            pretrained_state=self.pretrained_state,
            config=dict(config or {}),
            log=self.log,
        )

        head_ids = {id(p) for m in self.head for p in m.parameters()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [
            {"name": "backbone", "params": [p for p in params if id(p) not in head_ids]},
            {"name": "head", "params": [p for p in params if id(p) in head_ids]},
        ]
        for g in groups:
            g.setdefault("weight_decay", weight_decay)
        for m in self.methods:
            groups = m.configure_param_groups(groups, self.ctx)
        groups = [g for g in groups if g["params"]]
        if layer_decay is not None:  # per-layer LR scales, before the scheduler records initial_lr
            groups = split_by_layer(groups, self.model, layer_decay, lr, log=self.log)
        # sgd (default): torch.optim.SGD, the paper's; any other name: timm's (train/optim.py)
        self.optimizer = build_optimizer(
            groups,
            opt=opt,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=opt_eps,
            betas=tuple(opt_betas) if opt_betas else None,
        )

        owners = [(m, m.lr_lambda(self.ctx)) for m in self.methods]
        setters = [(m, f) for m, f in owners if f is not None]
        if len(setters) > 1:
            raise ValueError(
                "more than one method sets the learning-rate schedule: "
                + ", ".join(m.name for m, _ in setters)
            )
        lam: Callable[[int], float]
        if setters:
            lam = setters[0][1]
        elif lr_schedule == "cosine":
            lam = lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs))  # noqa: E731
        else:
            lam = lambda e: 1.0  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)

        # what the forward runs: DDP and torch.compile wrap the model; hooks stay on the inner modules
        self.forward_model: Any = self.model  # the module, or DDP / torch.compile's wrapper of it
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if compile:
            self.forward_model = torch.compile(self.forward_model)
        self._features: torch.Tensor | None = None
        if any(m.needs_features for m in self.methods):
            self.head[0].register_forward_pre_hook(self._capture_features)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        # per-image predicted classes (dataset order): the last epoch's and the best-validation epoch's
        # ({test,val}_{final,best_val}); saved with the checkpoint, so a resume keeps them
        self.preds: dict[str, torch.Tensor] = {}
        self._epoch_preds: dict[str, torch.Tensor] = {}
        # eval_test="needed": a copy of the model's state at the latest epoch whose validation accuracy is
        # the best so far ({"epoch", "state"}); its test split is evaluated after the last epoch, only if
        # that epoch is still the best-validation one then. Saved with the checkpoint.
        self._best_copy: dict[str, Any] | None = None
        self.pred_dtype = torch.int16 if data.num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32

    def _capture_features(self, module: nn.Module, args: tuple) -> None:
        self._features = args[0]

    # ------------------------------------------------------------------ batches
    def _train_iter(self, epoch: int):
        return prefetch(
            train_batches(
                self.data.train,
                self.local_batch,
                self.image_size,
                self.mean,
                self.std,
                seed=self.seed,
                epoch=epoch,
                drop_last=self.drop_last,
                channels_last=self.channels_last,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            ),
            self.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ state
    def state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "methods": {m.name: m.state_dict() for m in self.methods},
            "history": self.history,
            "predictions": self.preds,
            **({"best_copy": self._best_copy} if self._best_copy is not None else {}),
        }

    def restore(self) -> None:
        state = load_checkpoint(self.run_dir.path, self.model, self.meta, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for m in self.methods:
            m.load_state_dict(state["methods"].get(m.name, {}))
        self.history = [h for h in state["history"] if h["epoch"] <= int(state["epoch"])]
        # a state saved before predictions were kept has none: predictions.npz then lacks those keys
        self.preds = {k: v.cpu() for k, v in state.get("predictions", {}).items()}
        self._best_copy = state.get("best_copy")
        self.start_epoch = int(state["epoch"]) + 1
        if self.dist.is_main:
            self.run_dir.write_metrics(self.history)
        self.log(f"resumed from {self.run_dir.path} after epoch {state['epoch']}")

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        if resume:
            self.restore()
        for m in self.methods:
            m.setup(self.model, self.optimizer, self.ctx)
        epochs = range(self.start_epoch, self.epochs)
        try:
            for epoch in _progress(epochs, len(epochs), "epochs", self.progress, leave=True):
                row = self.train_epoch(epoch)
                self._refuse_non_finite(epoch)
                with defer_signals():  # history, checkpoint and metrics end at the same epoch
                    self.history.append(row)
                    if epoch == self.epochs - 1:
                        self._test_best_copy()
                    self._keep_predictions(epoch)
                    if self.dist.is_main:
                        save_checkpoint(self.run_dir.path, self.model, self.state(epoch), self.meta)
                        self.run_dir.write_metrics(self.history)
                self.log(self.format_row(row))
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the CLI names the run folder to resume
            e.rifle_run_dir = self.run_dir.path  # type: ignore[attr-defined]  # read by the CLI
            raise
        barrier(self.dist)
        # data-parallel replicas must end with bit-identical parameters; fail loudly otherwise
        # (buffers such as BN running stats are rank-local; DDP broadcasts rank 0's at each forward)
        self.replica_checksums = verify_replicas(list(self.model.parameters()), "end of training")
        return self.history

    def _keep_predictions(self, epoch: int) -> None:
        """This epoch's predictions become the final ones, and the best-validation ones when it is
        :func:`best_val_row`'s epoch (the rule of ``summary.json``'s ``best_val_epoch``)."""
        epoch_preds, self._epoch_preds = self._epoch_preds, {}
        for split, pred in epoch_preds.items():
            self.preds[f"{split}_final"] = pred
        best = best_val_row(self.history)
        if best is not None and best["epoch"] == epoch:
            for split, pred in epoch_preds.items():
                self.preds[f"{split}_best_val"] = pred

    def predictions(self) -> dict[str, Any]:
        """``predictions.npz``'s arrays (numpy, int16): per image of the split, in dataset order, the class
        predicted at the last epoch (``*_final``) and at the best-validation epoch (``*_best_val``), and the
        labels evaluated against (``*_labels``); ``val_*`` and ``test_best_val`` only with a validation
        split. A key whose predictions a resumed old checkpoint did not hold is left out."""
        has_val = len(self.data.val) > 0
        out: dict[str, Any] = {}
        for split in ("test", "val") if has_val else ("test",):
            for kind in ("final", "best_val") if has_val else ("final",):
                if f"{split}_{kind}" in self.preds:
                    out[f"{split}_{kind}"] = self.preds[f"{split}_{kind}"].numpy()
            out[f"{split}_labels"] = getattr(self.data, split).labels.to(self.pred_dtype).numpy()
        return out

    def _refuse_non_finite(self, epoch: int) -> None:
        """Every rank raises together when rank 0's weights (the ones it would save) hold a NaN or an inf:
        otherwise rank 0 alone stops and the others fail, or wait, in their next collective. One process:
        nothing to do here, save_checkpoint refuses them (one pass over the weights, not two)."""
        if not self.dist.enabled:
            return
        bad = broadcast_object(
            first_non_finite(self.model.state_dict()) if self.dist.is_main else None, self.dist
        )
        if bad is not None:
            raise non_finite_error(self.run_dir.path, epoch, bad)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss(
        self, x: torch.Tensor, y: torch.Tensor, terms_sum: dict[str, torch.Tensor], epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits = self.forward_model(x)
            loss = F.cross_entropy(logits.float(), y)
            total = loss
            for m in self.methods:
                for name, term in m.loss_terms(logits, self._features, x, y).items():
                    total = total + term
                    terms_sum[name] = terms_sum.get(name, 0.0) + term.detach().double() * len(y)
        self._features = None
        if not torch.isfinite(total.detach()):
            last = f"epoch {epoch - 1}" if epoch > 0 else "none yet"
            raise TrainingError(
                f"non-finite loss ({float(total.detach())}) at epoch {epoch}, step {step}; "
                f"stopping. Last good checkpoint in {self.run_dir.path}: {last}. "
                f"Try a lower --lr"
            )
        return logits, loss, total

    def _group_lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def _row_lr(self, lrs: dict[str, float]) -> float:
        """The backbone's LR in ``lrs`` without --layer-decay's per-layer scale (the schedule's LR)."""
        for i, g in enumerate(self.optimizer.param_groups):
            if g.get("group", g.get("name")) == "backbone":
                return lrs[g.get("name", str(i))] / g.get("layer_lr_scale", 1.0)
        return next(iter(lrs.values()))

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        # dropout etc. draw from the global RNG: make it a pure function of (seed, epoch[, rank])
        rank_index = (self.dist.rank,) if self.dist.enabled else ()
        torch.manual_seed(derive_seed(self.seed, "torch", epoch, *rank_index))
        events: dict[str, Any] = {}
        for m in self.methods:
            events.update(m.on_epoch_start(epoch))
        lrs = self._group_lrs()
        self.model.train()
        t0 = time.perf_counter()
        # accumulate on the device: no host sync per step
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        terms_sum: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        batches = _progress(self._train_iter(epoch), self.steps_per_epoch, f"epoch {epoch}", self.progress)
        if self.step_lines:
            self.step_lines.start(epoch, self.steps_per_epoch)
        for step, (x, y) in enumerate(batches):
            for m in self.methods:
                m.on_step_start(epoch * self.steps_per_epoch + step)
            if step == 0:  # the LRs the epoch's first step uses (a method may set them per step)
                lrs = self._group_lrs()
            x, y = self._to_device(x, y)
            for m in self.methods:
                x, y = m.transform_batch(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            chunks = list(zip(x.chunk(self.grad_accum), y.chunk(self.grad_accum)))
            for i, (xc, yc) in enumerate(chunks):
                sync = i == len(chunks) - 1 or not self.dist.enabled
                ctx = contextlib.nullcontext() if sync else self.forward_model.no_sync()
                with ctx:
                    logits, loss, total = self._loss(xc, yc, terms_sum, epoch, step)
                    self.scaler.scale(total * (len(yc) / len(y))).backward()
                loss_sum += loss.detach().double() * len(yc)
                hits = (logits.detach().argmax(1) == yc).sum()
                correct += hits
                for m in self.methods:
                    m.on_batch_end(loss.detach(), hits, len(yc))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            seen += len(y)
            if self.step_lines:
                self.step_lines.step(step, seen, loss_sum, lrs.get("backbone", next(iter(lrs.values()))))
        seconds = time.perf_counter() - t0
        self.scheduler.step()
        names = sorted(terms_sum)
        totals = all_sum(
            [float(loss_sum), float(correct), float(seen), *(float(terms_sum[n]) for n in names)], self.dist
        )
        loss_total, correct_total, seen_total = totals[:3]
        row: dict[str, Any] = {"epoch": epoch, "lr": self._row_lr(lrs)}
        if len(set(lrs.values())) > 1:
            row["lr_groups"] = lrs
        row.update(train_loss=loss_total / max(seen_total, 1), train_acc=correct_total / max(seen_total, 1))
        for name, s in zip(names, totals[3:]):
            row[f"loss_{name}"] = s / max(seen_total, 1)
        self._buffers_from_rank_0()
        val = self.evaluate(self.data.val) if len(self.data.val) else None
        row["val_acc"] = val["acc"] if val else None
        test = None
        if self.eval_test == "every" or epoch == self.epochs - 1:
            test = self.evaluate(self.data.test)
        elif self._new_best(row["val_acc"]):  # its test accuracy may become test_acc_at_best_val
            self._best_copy = {"epoch": epoch, "state": _copy_state(self.model)}
        self._epoch_preds = {
            **({"test": test["pred"]} if test else {}),
            **({"val": val["pred"]} if val else {}),
        }
        row["test_acc"] = test["acc"] if test else None  # best epochs' filled in by _test_best_copy
        row["val_loss"], row["test_loss"] = (val["loss"] if val else None), (test["loss"] if test else None)
        row["reinit"] = bool(events.pop("reinit", False))
        row.update(events)
        for m in self.methods:
            row.update(m.on_epoch_end(epoch))
        row["seconds"] = seconds
        row["images_per_s"] = seen_total / seconds if seconds > 0 else None
        return row

    def _new_best(self, val_acc: float | None) -> bool:
        """A validation accuracy at least the best so far (a new best or a tie: :func:`best_val_row` takes
        the latest). The same on every DDP rank (the validation accuracy is summed over ranks)."""
        if val_acc is None:
            return False
        return all(val_acc >= h["val_acc"] for h in self.history if h.get("val_acc") is not None)

    def _test_best_copy(self) -> None:
        """After the last epoch: when the best-validation epoch is an earlier one, evaluate the test split
        with the copy of the model kept at that epoch; its row and ``test_best_val`` get the results (the
        values evaluating it at that epoch would have given: the same weights, data and kernels)."""
        copy, self._best_copy = self._best_copy, None
        best = best_val_row(self.history)
        if copy is None or best is None or best["epoch"] != copy["epoch"]:
            return
        final = _copy_state(self.model)
        self.model.load_state_dict(copy["state"])
        test = self.evaluate(self.data.test)
        self.model.load_state_dict(final)
        best.update(test_acc=test["acc"], test_loss=test["loss"])
        self.preds["test_best_val"] = test["pred"]

    def _buffers_from_rank_0(self) -> None:
        """Under DDP every rank evaluates with rank 0's buffers (BatchNorm's running statistics), the ones
        the checkpoint saves: the last training step left each rank its own. DDP broadcasts them at every
        training forward anyway, so training is unchanged."""
        if self.dist.enabled:
            for b in self.model.buffers():
                torch.distributed.broadcast(b, src=0)

    @torch.inference_mode()
    def evaluate(self, ds) -> dict[str, Any]:
        """``acc``, ``loss``, ``n`` over the split, and ``pred``: the predicted class of every image, in
        dataset order (each DDP rank evaluates a contiguous block; the blocks are gathered in rank order)."""
        was_training = self.model.training
        self.model.eval()
        correct, n, loss = 0.0, 0.0, 0.0
        preds: list[torch.Tensor] = []
        for x, y in eval_batches(
            ds,
            self.eval_batch_size,
            self.image_size,
            self.mean,
            self.std,
            channels_last=self.channels_last,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        ):
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.model(x).float()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            pred = logits.argmax(1)
            correct += int((pred == y).sum())
            n += len(y)
            preds.append(pred.to(self.pred_dtype))
        self.model.train(was_training)
        correct, n, loss = all_sum([correct, n, loss], self.dist)
        local = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=self.pred_dtype)
        pred_all = torch.cat(gather_over_ranks(local)) if self.dist.enabled else local
        return {"acc": correct / max(n, 1), "loss": loss / max(n, 1), "n": int(n), "pred": pred_all}

    @staticmethod
    def format_row(r: dict[str, Any]) -> str:
        val = "  -  " if r.get("val_acc") is None else f"{r['val_acc']:.4f}"
        test = "  -  " if r.get("test_acc") is None else f"{r['test_acc']:.4f}"
        mark = "  <- re-init" if r.get("reinit") else ""
        return (
            f"epoch {r['epoch']:3d}  lr {r['lr']:.5f}  loss {r['train_loss']:.4f}  "
            f"train {r['train_acc']:.4f}  val {val}  test {test}  "
            f"{r['images_per_s'] or 0:.0f} img/s{mark}"
        )


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def best_val_row(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch of highest validation accuracy, the latest on a tie; None without validation."""
    with_val = [h for h in history if h.get("val_acc") is not None]
    return max(with_val, key=lambda h: (h["val_acc"], h["epoch"])) if with_val else None


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """final_test_acc (last epoch, the paper's protocol) and test_acc_at_best_val (selection on val)."""
    if not history:
        return {}
    final = history[-1]
    best = best_val_row(history)
    return {
        "final_test_acc": final["test_acc"],
        "final_val_acc": final.get("val_acc"),
        "best_val_acc": best["val_acc"] if best else None,
        "test_acc_at_best_val": best["test_acc"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "epochs_run": len(history),
        "train_seconds": sum(h["seconds"] for h in history),
        "reinit_epochs_seen": [h["epoch"] for h in history if h.get("reinit")],
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev
