"""``tetsnn train``: one training engine for a CPU, a GPU or many (torchrun + DDP).

    tetsnn train [--config FILE|PRESET] [--KEY VALUE ...]
    torchrun --nproc_per_node=K -m tetsnn train ...

The run directory receives config.yaml, data.json, metrics.jsonl, last.pt, best.pt, TensorBoard
events and curves.png. SIGTERM / SIGINT / SIGUSR1 on any subset of the processes stop every rank
after the same optimizer step; rank 0 saves last.pt and every process exits with status 0.
``--resume DIR`` continues from exactly that step, on any number of processes; ``--resume auto``
continues ``--out DIR`` if it holds a run and starts one there otherwise.

The ranks agree on everything that ends or saves a run through collectives that every rank makes
at the same point: a max-reduce of (non-finite loss, stop requested) at every step, a max-reduce of
the stop flag at every evaluation batch and after each epoch, and a broadcast of rank 0's write
result after every save. A failed collective (a peer died) ends the process with an error and
writes nothing.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from functools import partial

import torch
import yaml
from torch import nn

from .checkpoint import (CheckpointError, CheckpointWriteError, build_model, load_checkpoint, load_trained_model,
                         rng_state, save_checkpoint, set_rng_state)
from .config import (ConfigError, T_at_epoch, absolute_paths, load_config, parse_T_schedule, parse_train_args,
                     resolve)
from . import distributed as _distributed
from .. import utils as _utils
from .distributed import all_reduce_max, all_reduce_sum, cleanup, pause_point, setup, share
from .allocator import apply_allocator_config
from .evaluate import autocast, evaluate
from ..loss import half_to_float, sdt_loss, tet_loss
from .transfer import freeze, load_ann_weights
from ..utils import (FileWriteError, FolderLock, Interrupted, atomic_path, io_error_line, make_folder,
                     os_error_text, remove_stale_temps, seed_all, write_error)

__all__ = ["build_model", "build_criterion", "build_optimizer", "compile_model", "resolve_run_config", "fit",
           "main", "NonFiniteLoss"]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def build_criterion(cfg: dict):
    """``loss(outputs [N, T, C], y) -> scalar``: TET (with lamb, means) or standard direct training,
    with the config's label smoothing. ``y``: hard labels [N] or soft targets [N, C]. (The test loss is
    this criterion of the config with ``label_smoothing: 0``.)"""
    smoothing = cfg.get("label_smoothing", 0.0)
    kw = dict(label_smoothing=smoothing) if smoothing else {}
    if cfg["loss"] == "tet":
        return partial(tet_loss, lamb=cfg["lamb"], means=cfg["means"], **kw)
    return partial(sdt_loss, **kw) if kw else sdt_loss


def build_mixup(cfg: dict):
    """The batch mixing of a config (``mixup``, ``cutmix``, ``mixup_prob``), or None when both are off."""
    if not (cfg.get("mixup", 0) or cfg.get("cutmix", 0)):
        return None
    from ..data.augment import Mixup

    return Mixup(cfg["num_classes"], mixup=cfg["mixup"], cutmix=cfg["cutmix"], prob=cfg["mixup_prob"])


def mix_rng(seed: int, epoch: int, step: int):
    """The draws of global training batch ``step`` of ``epoch``: the same on every process."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence([seed, epoch, step, 0x6D6978]))


def lr_factor(cfg: dict, epoch: int) -> float:
    """The learning rate of 0-based ``epoch`` over the peak: ``(epoch + 1) / (warmup + 1)`` in the
    ``warmup_epochs`` first epochs, then the cosine ``(1 + cos(pi epoch / epochs)) / 2`` (the curve
    of a run without warmup, from the same epoch on)."""
    warmup = cfg.get("warmup_epochs", 0)
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return (1 + math.cos(math.pi * epoch / cfg["epochs"])) / 2


def build_scheduler(cfg: dict, optimizer):
    """Per epoch: cosine to 0 over ``epochs`` (``CosineAnnealingLR``), after a linear warmup when
    ``warmup_epochs`` > 0 (``LambdaLR`` of ``lr_factor``, which reads ``cfg``)."""
    if cfg.get("warmup_epochs", 0):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"], eta_min=0)


def build_optimizer(cfg: dict, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]   # frozen ones stay out
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def compile_model(cfg: dict, model: nn.Module) -> nn.Module:
    """``compile: true``: ``torch.compile`` the model's forward in place (``nn.Module.compile``), so
    training and evaluation run compiled while its state_dict keeps the plain keys (no
    ``_orig_mod.``): compiled and eager runs read and write the same checkpoints."""
    if cfg["compile"]:
        model.compile()
    return model


def prepare_model(cfg: dict, model: nn.Module, say=print) -> None:
    """ANN-to-SNN transfer (``init_from``) and freezing (``freeze``), reported through ``say``."""
    if cfg["init_from"] and not cfg["resume"]:     # a resumed run has its own weights
        rep = load_ann_weights(model, cfg["init_from"])
        say(f"init-from {cfg['init_from']}: loaded {len(rep['loaded'])} tensors; "
            f"missing keys (left as initialised): {rep['missing'] or 'none'}; "
            f"unexpected keys (not used): {rep['unexpected'] or 'none'}")
    if cfg["freeze"]:
        try:
            names = freeze(model, cfg["freeze"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        say(f"freeze {cfg['freeze']}: {len(names)} parameter tensors frozen")


# keys that say where and how the run executes, not what is trained: a resumed run may change them
LOCATION_KEYS = ("data_dir", "cache_dir", "device", "workers", "compile", "mmap_threshold", "memory")
# keys that say how long and how often, not what: a resumed run may change them too
SCHEDULE_KEYS = ("epochs", "checkpoint_every")


def resolve_run_config(argv) -> dict:
    """Command line -> the run's config. With --resume, the saved config, where any explicitly given
    key must agree with it, except the SCHEDULE_KEYS (``epochs`` may extend the run) and the
    LOCATION_KEYS. ``--resume auto`` resumes ``--out DIR`` when it holds a last.pt, and starts a new
    run there otherwise. Relative paths (flags and config file alike) are taken from the current
    directory and kept absolute."""
    config_file, flags = parse_train_args(argv)
    flags = absolute_paths(flags)
    from_file = absolute_paths(load_config(config_file or "digits"))
    if "T" in flags and ({**(from_file if config_file else {}), **flags}).get("T_schedule"):
        raise ConfigError("give either --T or a T schedule (--T-schedule), not both")
    given = {**(from_file if config_file else {}), **flags}
    if given.get("resume") == "auto":
        if not given.get("out"):
            raise ConfigError("--resume auto needs --out DIR (the run directory to continue, or to start)")
        if not os.path.exists(os.path.join(given["out"], "last.pt")):
            damaged = _run_files(given["out"])
            if damaged:
                raise ConfigError(f"{given['out']} holds a run without its last.pt ({', '.join(damaged)} present): "
                                  f"it cannot be resumed; move it away or start with another --out")
            return resolve({**from_file, **flags, "resume": None})
        flags["resume"] = given["resume"] = given["out"]
    if flags.get("resume") is None:
        return resolve({**from_file, **flags})
    run_dir = flags["resume"]
    saved = load_checkpoint(os.path.join(run_dir, "last.pt"))["config"]
    free = {k for k, v in given.items() if k in ("resume",) + SCHEDULE_KEYS + LOCATION_KEYS
            or (k == "out" and os.path.abspath(v) == os.path.abspath(run_dir))}
    # compare values as the run reads them (a flag "1e-3" is the saved 0.001; a key newer than the
    # run has its default; a path is absolute)
    had = resolve(absolute_paths({**saved, "resume": None}))
    wanted = resolve({**had, **{k: v for k, v in given.items() if k not in free}})
    for key, value in given.items():
        if key in free:
            continue
        if wanted[key] != had[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag} {value} contradicts the resumed run's {key}: {saved.get(key)!r}")
    moved = {k: given[k] for k in LOCATION_KEYS + SCHEDULE_KEYS if k in given}
    return resolve({**saved, **moved, "resume": run_dir, "out": run_dir})


class StopRequest:
    """SIGTERM / SIGINT / SIGUSR1 request a stop; the ranks agree on it and stop after the same
    optimizer step. A signal does nothing else, so it never interrupts a write, and a second one
    changes nothing.

    The signals are taken synchronously: while the block runs they are blocked in the calling (main)
    thread, and so in every thread started from it (the process group's, the autograd engine's,
    ...), and ``requested`` collects any that are pending (``sigtimedwait``). No signal is ever
    delivered into a thread that happens to be in a system call. A handler that sets the same flag
    covers threads that existed before (none in a ``tetsnn train`` process).

    On leaving, the previous handlers and mask come back, except in a torchrun worker
    (``keep_ignoring``), which is about to exit: there the signals stay blocked and ignored, so a late
    one cannot kill a process that has finished cleanly."""

    SIGNALS = _distributed.STOP_SIGNALS

    def __init__(self, keep_ignoring: bool = False):
        self._requested = False
        self.previous = {}
        self.keep_ignoring = keep_ignoring

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        _utils.poll_signals = self.poll
        _utils.stop_checks.append(self._check)      # a frame-cache build stops too
        return self

    def _check(self):
        return self.requested

    def _handle(self, signum, frame):
        self._requested = True
        _utils.signals_received += 1

    def poll(self):
        """Take every pending stop signal (without waiting)."""
        while signal.sigtimedwait(self.SIGNALS, 0) is not None:
            self._handle(None, None)

    @property
    def requested(self) -> bool:
        self.poll()
        return self._requested

    def __exit__(self, *exc):
        self.poll()
        _utils.poll_signals = None
        if self._check in _utils.stop_checks:
            _utils.stop_checks.remove(self._check)
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_IGN if self.keep_ignoring else handler)
        if not self.keep_ignoring:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


def _write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _fresh_run_dir(cfg) -> str:
    """Create ``runs/<time>-<dataset>-<model>`` (``-2``, ``-3``, ... when taken): ``os.mkdir`` fails
    on an existing name, so runs started in the same second get different directories."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}-{cfg['dataset']}-{cfg['model']}")
    make_folder("runs")
    i = 1
    while True:
        path = base if i == 1 else f"{base}-{i}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            i += 1
        except OSError as e:
            raise write_error(path, e, "create the run directory") from None


RUN_LOCK = ".lock"     # the run directory's lock file (held by rank 0 for the run's life)


class RunLocked(ConfigError):
    """Another live process holds the run directory."""


def _run_files(out) -> list:
    """The files in ``out`` that only a run which has finished an epoch writes (best.pt, metrics
    rows): a run directory holding them but no last.pt is damaged."""
    found = []
    if os.path.isfile(os.path.join(out, "best.pt")):
        found.append("best.pt")
    try:
        if os.path.getsize(os.path.join(out, "metrics.jsonl")) > 0:
            found.append("metrics.jsonl")
    except OSError:
        pass
    return found


def _on_rank0(main: bool, what):
    """Rank 0 runs ``what()``; every rank gets its result, or raises the same error (one line)."""
    result = error = None
    if main:
        try:
            result = what()
        except (ConfigError, CheckpointError, FileWriteError) as e:
            error = (type(e), str(e))
        except OSError as e:
            error = (FileWriteError, io_error_line(e))
    result, error = share((result, error))
    if error:
        raise error[0](error[1])
    return result


def _lock_run(out: str, main: bool):
    """Rank 0 takes the lock of the run directory ``out`` (creating the directory), for the run's
    life; a live holder is a RunLocked error naming it, on every rank, and nothing is written."""
    def take():
        make_folder(out)
        lock = FolderLock(os.path.join(out, RUN_LOCK))
        if not lock.try_acquire():
            raise RunLocked(f"{out} is in use by a live run ({lock.holder()}); wait for it to end or give "
                            f"another --out")
        held.append(lock)
    held = []
    _on_rank0(main, take)
    return held[0] if held else None


def _check_fresh(out: str, main: bool):
    """A new run may not start over a directory that holds one (its lock is held by the caller)."""
    def check():
        if os.path.exists(os.path.join(out, "last.pt")):
            raise ConfigError(f"{out} already holds a run (last.pt); resume it with --resume {out} "
                              f"(or --resume auto)")
        damaged = _run_files(out)
        if damaged:
            raise ConfigError(f"{out} holds a run without its last.pt ({', '.join(damaged)} present); "
                              f"move it away or give another --out")
    _on_rank0(main, check)


def _best_held(path):
    """``dict(epoch, test_acc)`` of the best.pt at ``path``; None when it is missing or unreadable."""
    try:
        return load_checkpoint(path)["best"]
    except (CheckpointError, KeyError):
        return None


def _recover_best(out: str, last: dict, say) -> dict | None:
    """Make best.pt agree with the history's best epoch (``last["best"]``). When the write of best.pt
    was killed, last.pt holds that epoch (it is written first) and is copied to best.pt. Otherwise
    say so in one line. Returns the best that best.pt holds (rank 0 only; runs under the run lock)."""
    wanted = last["best"]
    if wanted is None:
        return None
    best_path = os.path.join(out, "best.pt")
    held = _best_held(best_path)
    if held is not None and held["epoch"] >= wanted["epoch"]:
        return held
    if last["epoch"] == wanted["epoch"] and last["step"] == 0:
        try:
            with atomic_path(best_path) as tmp:
                shutil.copyfile(os.path.join(out, "last.pt"), tmp)
        except OSError as e:
            raise CheckpointWriteError(f"cannot write checkpoint {best_path}: {os_error_text(e)}") from None
        say(f"best.pt recovered from last.pt (epoch {wanted['epoch']}, test accuracy "
            f"{100 * wanted['test_acc']:.2f}%): its write had been interrupted")
        return wanted
    what = (f"epoch {held['epoch']} ({100 * held['test_acc']:.2f}%)" if held else "no weights")
    say(f"warning: best.pt holds {what}, but the best test accuracy was {100 * wanted['test_acc']:.2f}% at "
        f"epoch {wanted['epoch']}, whose weights are no longer saved; best.pt keeps the best epoch it can hold")
    return held


class RunFiles:
    """Everything rank 0 writes: config.yaml, data.json, metrics.jsonl, TensorBoard, curves.png.

    Opening a run directory removes the temporary files of a killed write and rewrites metrics.jsonl
    from ``history`` (the checkpoint's), so it never holds a row newer than last.pt; TensorBoard
    drops the events after that epoch (``purge_step``)."""

    def __init__(self, out: str, cfg: dict, data_info: dict, history: list):
        from torch.utils.tensorboard import SummaryWriter

        make_folder(out)
        self.out = out
        remove_stale_temps(out)     # only the holder of the run lock gets here
        _write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
        _write_text(os.path.join(out, "data.json"), json.dumps(data_info) + "\n")
        self.write_metrics(history)
        self.tb = SummaryWriter(log_dir=out, purge_step=len(history) + 1 if cfg["resume"] else None)

    def path(self, name):
        return os.path.join(self.out, name)

    def write_metrics(self, history):
        _write_text(self.path("metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in history))

    def epoch_done(self, history):
        self.write_metrics(history)
        m = history[-1]
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"):
            self.tb.add_scalar(key, m[key], m["epoch"])
        self.tb.flush()
        self.plot(history)

    def plot(self, history):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [m["epoch"] for m in history]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, what in zip(axes, ("loss", "acc")):
            for split in ("train", "test"):
                ax.plot(ep, [m[f"{split}_{what}"] for m in history], marker="o", label=split)
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss" if what == "loss" else "accuracy")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        with atomic_path(self.path("curves.png")) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)

    def close(self):
        self.tb.close()


class Trainer:
    """Holds a run's state; ``fit`` trains from its current position (epoch, step) to the end."""

    def __init__(self, cfg: dict, rank: int, world_size: int, device: torch.device):
        from .data import build_data

        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.main = rank == 0
        seed_all(cfg["seed"])                      # the same initial weights on every rank
        self.data = build_data(cfg, device, rank, world_size)
        model = build_model(cfg)
        prepare_model(cfg, model, say=print if self.main else (lambda *a: None))
        model = model.to(device)
        self.schedule = parse_T_schedule(cfg["T_schedule"]) if cfg["T_schedule"] else None
        if cfg["sync_bn"] and world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = compile_model(cfg, model)
        self.ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
        self.criterion = build_criterion({**cfg, "label_smoothing": 0.0})     # the test loss: never smoothed
        self.train_criterion = build_criterion(cfg)
        self.mixup = build_mixup(cfg)
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")
        self.epoch, self.step = 0, 0              # finished epochs; optimizer steps done in the next one
        self.run_steps = 0                        # optimizer steps since the start of the run
        self.partial = [0.0, 0.0, 0.0, 0.0]       # that epoch's loss sum, correct, samples, seconds
        self.history, self.best = [], None
        seed_all(cfg["seed"] + rank)               # per-rank seeding for anything random from here on

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self, partial) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                    epoch=self.epoch, step=self.step, run_steps=self.run_steps, partial=list(partial),
                    history=list(self.history), best=self.best, rng=rng_state(), config=dict(self.cfg),
                    world_size=self.world_size)

    def load(self, ckpt: dict):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if not hasattr(self.scheduler, "T_max"):       # warmup + cosine: the lr of the saved epoch, under --epochs
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * lr_factor(self.cfg, ckpt["epoch"])
        elif self.scheduler.T_max != self.cfg["epochs"]:   # --epochs extends the run: the longer cosine
            self.scheduler.T_max = self.cfg["epochs"]
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * (1 + math.cos(math.pi * ckpt["epoch"] / self.cfg["epochs"])) / 2
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.history, self.best = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best"]
        self.run_steps = ckpt.get("run_steps", self.epoch * len(self.data.train) + self.step)
        # the saved partial sums are already summed over ranks: rank 0 carries them
        self.partial = list(ckpt["partial"]) if self.main else [0.0, 0.0, 0.0, 0.0]
        if self.main:
            set_rng_state(ckpt["rng"])

    def write(self, out, what, *args):
        """Rank 0 runs ``what(*args)`` (writes files in the run directory ``out``); every rank learns
        its result. A failed write is a CheckpointWriteError on every rank, with rank 0's message."""
        error = None
        if self.main:
            try:
                what(*args)
            except (CheckpointWriteError, FileWriteError) as e:
                error = str(e)
            except OSError as e:
                error = f"cannot write to {out}: {os_error_text(e)}"
        error = share(error)
        if error:
            raise CheckpointWriteError(error)

    def save(self, files, names=("last.pt",)):
        """Write the current state (a step boundary every rank has reached) to ``names``; collective."""
        summed = self.reduced_partial()      # the checkpoint keeps the sums of all ranks
        partial = summed + [self.partial[3]]

        def write():
            state = self.state(partial)
            for name in names:
                save_checkpoint(state, files.path(name))
        self.write(files.out if files else None, write)

    # -- training ------------------------------------------------------------------------------
    def train_epoch(self, stop: StopRequest, progress, every_steps) -> bool:
        """Train from ``self.step`` to the end of epoch ``self.epoch + 1``; False if stopped early.
        ``every_steps()`` runs after each optimizer step that does not end the epoch (collective)."""
        loader = self.data.train
        loader.set_epoch(self.epoch + 1, start=self.step)
        if self.schedule:
            self.model.T = T_at_epoch(self.schedule, self.epoch + 1)
        self.ddp.train()
        t0, seconds0 = time.perf_counter(), self.partial[3]
        steps = len(loader)
        off = self.cfg.get("mixup_off_epoch", 0)
        mixup = self.mixup if self.mixup is not None and not (off and self.epoch + 1 > off) else None
        for x, y in loader:
            target = y
            if mixup is not None:
                x, target = mixup(x, y, mix_rng(self.cfg["seed"], self.epoch + 1, self.step))
            with autocast(self.device, self.cfg["amp"]):
                out = self.ddp(x)
            loss = self.train_criterion(half_to_float(out), target)
            # one collective decides for every rank: stop on a non-finite loss, or after this step
            flags = all_reduce_max(torch.tensor([float(not torch.isfinite(loss).item()), float(stop.requested)],
                                                device=self.device))
            if flags[0]:
                raise NonFiniteLoss(f"non-finite training loss at epoch {self.epoch + 1}, step {self.step + 1}")
            # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the
            # global batch makes that the gradient of the global batch mean (1 unless the last batch is
            # split unevenly)
            weight = len(y) * self.world_size / loader.global_size(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss * weight if weight != 1 else loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.run_steps += 1
            n = len(y)
            correct = (half_to_float(out.detach()).mean(1).argmax(1) == y).sum().item()
            self.partial[0] += loss.item() * n
            self.partial[1] += correct
            self.partial[2] += n
            self.partial[3] = seconds0 + time.perf_counter() - t0
            progress(self.partial)
            pause_point("step", self.run_steps)
            if flags[1]:
                return False
            if self.step < steps:
                every_steps()
        return True

    def reduced_partial(self):
        return all_reduce_sum(torch.tensor(self.partial[:3], dtype=torch.float64, device=self.device)).tolist()

    def finish_epoch(self, stop: StopRequest):
        """Evaluate and close the epoch; None (and nothing changed) if a signal abandoned the evaluation."""
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum, correct, count = self.reduced_partial()
        test = evaluate(self.model, self.data.test, self.criterion, self.cfg["amp"],
                        should_stop=lambda: stop.requested)
        if test is None:
            return None
        with warnings.catch_warnings():   # resumed after the epoch's last step, no optimizer step ran here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.epoch += 1
        m = dict(epoch=self.epoch, train_loss=loss_sum / max(count, 1), train_acc=correct / max(count, 1),
                 test_loss=test["loss"], test_acc=test["top1"], lr=lr, seconds=self.partial[3],
                 world_size=self.world_size)
        if self.schedule:
            m["T"] = self.model.T
        self.history.append(m)
        self.step, self.partial = 0, [0.0, 0.0, 0.0, 0.0]
        return m


def _progress(trainer, cfg):
    """A tqdm bar on an interactive rank 0; nothing otherwise (one line per epoch is printed)."""
    if not (trainer.main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=len(trainer.data.train), initial=trainer.step, leave=False,
                desc=f"epoch {trainer.epoch + 1}/{cfg['epochs']}", dynamic_ncols=True)


def _summary(history, best, out, say) -> dict:
    """``best``: what best.pt holds (the history's best, unless its weights were lost)."""
    final = history[-1]
    held = f"{100 * best['test_acc']:.2f}% (epoch {best['epoch']})" if best else "none saved in best.pt"
    lost = max(history, key=lambda m: m["test_acc"])
    if best and lost["test_acc"] > best["test_acc"]:
        held += (f", as held by best.pt (epoch {lost['epoch']} reached {100 * lost['test_acc']:.2f}%, "
                 f"its weights were lost)")
    say(f"best test accuracy: {held}; "
        f"final test accuracy: {100 * final['test_acc']:.2f}% (epoch {final['epoch']})")
    if out:
        say(f"run directory: {out}")
    return dict(interrupted=False, best=best, final=final, out=out)


def short_run_note(model: nn.Module, share: float = 0.01):
    """A one-line note when the model's BatchNorm running statistics, which evaluation uses, still
    hold more than ``share`` of their initial values (mean 0, variance 1): after few optimizer steps
    the test accuracy can then be near chance while the training accuracy is high. None otherwise."""
    left, updates = 0.0, None
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is not None:
            n = int(m.num_batches_tracked)
            if (1 - m.momentum) ** n > left:
                left, updates = (1 - m.momentum) ** n, n
    if left <= share:
        return None
    return (f"note: the BatchNorm running statistics have seen only {updates} training batches and still hold "
            f"{100 * left:.0f}% of their initial values; the test accuracy, which uses them, can be near chance "
            f"until more steps run (more epochs, or a larger --limit-train)")


# errors every rank raises at the same point (decided by a collective): the ranks still leave the
# process group together. Any other error may be one rank's alone (or a failed collective), so that
# process leaves at once and its peers' next collective fails.
AGREED_ERRORS = (NonFiniteLoss, CheckpointWriteError, Interrupted)


def fit(cfg: dict, stop: StopRequest = None) -> dict:
    """Train (or resume) the run ``cfg`` describes. Returns a summary dict. ``stop``: the signal flag
    (installed here when not given)."""
    if stop is None:
        with StopRequest() as stop:
            return fit(cfg, stop)
    apply_allocator_config(cfg)
    from .data import default_data_dir

    # the run records absolute paths: its directory works from any directory
    cfg = absolute_paths({**cfg, "data_dir": cfg["data_dir"] or default_data_dir(cfg["dataset"])})
    if cfg["sync_bn"] and not (cfg["device"].startswith("cuda") or (cfg["device"] == "auto" and torch.cuda.is_available())):
        raise ConfigError("--sync-bn needs CUDA GPUs (SyncBatchNorm does not run on the CPU)")
    if cfg["sync_bn"] and cfg["memory"] == "min":
        raise ConfigError("--memory min does not combine with --sync-bn (the recompute in backward would gather "
                          "the BatchNorm statistics across processes a second time)")
    rank, world, device = setup(cfg["device"])
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    ordered, files, lock = False, None, None
    try:
        # an existing run directory is locked before anything else (a live owner refuses the start at
        # once); a new one is created only once the data and the model are ready (a bad config or
        # an interrupted cache build leaves nothing behind)
        existing = cfg["resume"] or (cfg["out"] if share(main and os.path.isdir(cfg["out"] or "")) else None)
        if existing:
            lock = _lock_run(existing, main)
        ckpt = load_checkpoint(os.path.join(cfg["resume"], "last.pt")) if cfg["resume"] else None
        best = None
        if ckpt is not None:
            best = _on_rank0(main, lambda: _recover_best(cfg["resume"], ckpt, say))
        if ckpt is not None and ckpt["epoch"] >= cfg["epochs"]:     # a finished run: its summary
            say(f"{cfg['resume']} holds a finished run ({ckpt['epoch']} epochs)")
            ordered = True
            return _summary(ckpt["history"], best, cfg["resume"], say)
        if ckpt is None and existing:
            _check_fresh(existing, main)
        trainer = Trainer(cfg, rank, world, device)
        if ckpt is not None:
            trainer.load(ckpt)   # load_state_dict moves it
            trainer.best = best
            out = cfg["resume"]
        else:
            out = cfg["out"]
            if out and lock is None:
                lock = _lock_run(out, main)
                _check_fresh(out, main)
            if not out:       # a new auto-named directory, locked by its creator
                made = []

                def create():
                    out = _fresh_run_dir(cfg)
                    made.append(FolderLock(os.path.join(out, RUN_LOCK)))
                    made[0].try_acquire()          # a new name: nobody else holds it
                    return out
                out = _on_rank0(main, create)
                lock = made[0] if made else None
            out = os.path.abspath(out)
            trainer.cfg = cfg = {**cfg, "out": out}
        del ckpt
        opened = []
        trainer.write(out, lambda: opened.append(RunFiles(out, cfg, trainer.data.info, trainer.history)))
        files = opened[0] if opened else None
        result = _loop(trainer, files, cfg, world, stop)
        ordered = True
        return result
    except AGREED_ERRORS:
        ordered = True
        raise
    finally:
        if files:
            files.close()
        if lock is not None:
            lock.release()
        cleanup(ordered)


def _loop(trainer, files, cfg, world, stop) -> dict:
    say = print if trainer.main else (lambda *a, **k: None)
    if trainer.epoch == 0 and trainer.step == 0:
        say(f"training {cfg['model']} on {cfg['dataset']} ({trainer.data.info.get('train_used')} train / "
            f"{trainer.data.info.get('test_used')} test samples), T={cfg['T']}, {cfg['epochs']} epochs, "
            f"{world} process(es) on {trainer.device}; run directory {files.out if files else ''}")
    else:
        say(f"resuming {files.out if files else ''} at epoch {trainer.epoch + 1}, step {trainer.step} "
            f"on {world} process(es)")
    resume_hint = f"continue with: tetsnn train --resume {files.out if files else ''}"
    pause_point("start")
    if all_reduce_max(torch.tensor([float(stop.requested)], device=trainer.device))[0]:
        if not cfg["resume"]:      # a new run: its start is saved, so that the hint works
            trainer.save(files)
            say(f"stopped by signal before the first step; saved last.pt (the run's start). {resume_hint}")
        else:
            say(f"stopped by signal before the first step; nothing new to save. {resume_hint}")
        return dict(interrupted=True, epoch=trainer.epoch, step=trainer.step)
    every = cfg["checkpoint_every"]

    def every_steps():
        if every and trainer.run_steps % every == 0:
            trainer.save(files)
    while trainer.epoch < cfg["epochs"]:
        bar = _progress(trainer, cfg)

        def progress(p):   # p: loss sum, correct, samples, seconds of this rank
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{p[0] / p[2]:.4f}", acc=f"{p[1] / p[2]:.3f}",
                                samples_s=f"{p[2] * world / max(p[3], 1e-9):.0f}")
        try:
            done = trainer.train_epoch(stop, progress, every_steps)
        except NonFiniteLoss as e:
            last = files.path("last.pt") if files else "last.pt"
            kept = f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written yet"
            raise NonFiniteLoss(f"{e}; stopping, {kept}") from None
        finally:
            if bar is not None:
                bar.close()
        if not done:
            trainer.save(files)
            say(f"stopped by signal at epoch {trainer.epoch + 1}, step {trainer.step}; saved last.pt. {resume_hint}")
            return dict(interrupted=True, epoch=trainer.epoch, step=trainer.step)
        m = trainer.finish_epoch(stop)
        if m is None:     # a signal during the evaluation: keep the trained epoch, evaluate on resume
            trainer.save(files)
            say(f"stopped by signal while evaluating epoch {trainer.epoch + 1}; saved last.pt (its training "
                f"is complete; the evaluation runs again on resume). {resume_hint}")
            return dict(interrupted=True, epoch=trainer.epoch, step=trainer.step)
        is_best = trainer.best is None or m["test_acc"] > trainer.best["test_acc"]
        if is_best:
            trainer.best = dict(epoch=m["epoch"], test_acc=m["test_acc"])
        # the checkpoint first: metrics.jsonl never holds a row newer than last.pt
        trainer.save(files, ("last.pt", "best.pt") if is_best else ("last.pt",))
        trainer.write(files.out if files else None, files.epoch_done if files else None, trainer.history)
        say(f"epoch {m['epoch']}/{cfg['epochs']}  train loss {m['train_loss']:.4f} acc {100 * m['train_acc']:.2f}%  "
            f"test loss {m['test_loss']:.4f} acc {100 * m['test_acc']:.2f}%  lr {m['lr']:.2e}  {m['seconds']:.1f}s")
        if all_reduce_max(torch.tensor([float(stop.requested)], device=trainer.device))[0]:
            say(f"stopped by signal after epoch {trainer.epoch}; {resume_hint}")
            return dict(interrupted=True, epoch=trainer.epoch, step=0)
    note = short_run_note(trainer.model)
    if note:
        say(note)
    return _summary(trainer.history, trainer.best, files.out if files else None, say)


def main(argv=None) -> int:
    from ..data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    # from the first moment, a signal is a stop request (a torchrun worker then ignores late ones)
    with StopRequest(keep_ignoring="LOCAL_RANK" in os.environ) as stop:
        try:
            fit(resolve_run_config(argv), stop)
        except (ConfigError, CheckpointError, DataError, NonFiniteLoss) as e:
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"tetsnn train: error: {e}", file=sys.stderr)
            return 1 if isinstance(e, (NonFiniteLoss, CheckpointWriteError)) else 2
        except Interrupted as e:
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"{e}; nothing was saved in the run directory. continue with: "
                      f"{shlex.join(['tetsnn', 'train', *argv])}", flush=True)
            return 0
        except OSError as e:    # a file or folder that could not be written or read (one line)
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"tetsnn train: error: {io_error_line(e)}", file=sys.stderr)
            return 1
        except RuntimeError as e:
            if not _lost_peer(e):
                raise
            print(f"tetsnn train: error: rank {os.environ.get('RANK', 0)}: lost contact with the other "
                  f"processes ({_first_line(e)}); nothing was saved by this rank", file=sys.stderr)
            return 1
    return 0


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _lost_peer(e: BaseException) -> bool:
    """A collective that failed because another process is gone (gloo / NCCL / the store)."""
    import torch.distributed as dist

    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and (isinstance(e, dist.DistError) or any(
        w in str(e) for w in ("Connection closed", "Connection reset", "Broken pipe", "gloo", "NCCL")))
