"""Evaluation of a spiking model, and the ``tetsnn test`` command.

``tetsnn test --checkpoint FILE [--data-dir DIR] [--cache-dir DIR] [--json]`` rebuilds the model and the test set from
the checkpoint's config and reports top-1 and top-5 of the time-averaged logits, plus
``per_step_top1``: the top-1 of the average of the first t steps, for t = 1..T.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from .distributed import all_reduce_max, all_reduce_sum, pause_point
from ..loss import half_to_float

__all__ = ["autocast", "evaluate", "main"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """Mixed-precision context for ``amp`` in {"bf16", "fp16", "none"}."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@torch.no_grad()
def evaluate(model, loader, criterion=None, amp: str = "none", should_stop=None) -> dict:
    """Top-1 / top-5 of the time-averaged logits, top-1 of the first t steps, and the mean loss,
    summed over every rank's share of the test set (each test sample counts exactly once).

    With ``should_stop`` (a callable), the ranks max-reduce it before every batch (as many times on
    every rank, whatever each rank's share) and all abandon the evaluation, returning None, as soon
    as one rank's is true."""
    was_training = model.training
    model.eval()
    sums = None   # [count, loss sum, top-5 correct, top-1 correct using steps 1..t for each t]
    batches, steps = iter(loader), len(loader)
    if should_stop is not None:
        flag_device = next(model.parameters()).device
        steps = int(all_reduce_max(torch.tensor([steps], device=flag_device))[0])
    for _ in range(steps):
        if should_stop is not None:
            pause_point("eval")
            if all_reduce_max(torch.tensor([float(should_stop())], device=flag_device))[0]:
                model.train(was_training)
                return None
        batch = next(batches, None)
        if batch is None:   # this rank's share is done; it keeps taking part in the stop check
            continue
        x, y = batch
        with autocast(x.device, amp):
            out = model(x)
        out = half_to_float(out)
        T = out.shape[1]
        if sums is None:
            sums = torch.zeros(3 + T, dtype=torch.float64, device=x.device)
        running = out.cumsum(1) / torch.arange(1, T + 1, device=out.device).view(1, T, 1)  # [N, T, C]
        sums[3:] += (running.argmax(2) == y[:, None]).sum(0)
        k = min(5, out.shape[2])
        sums[2] += (running[:, -1].topk(k, dim=1).indices == y[:, None]).any(1).sum()
        if criterion is not None:
            sums[1] += criterion(out, y).double() * len(y)
        sums[0] += len(y)
    model.train(was_training)
    if sums is None:   # this rank had no test samples; the model's T gives the shape
        sums = torch.zeros(3 + getattr(model, "T", 1), dtype=torch.float64, device=next(model.parameters()).device)
    all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    per_step = (sums[3:] / n).tolist()
    return dict(count=int(sums[0].item()), loss=sums[1].item() / n, top1=per_step[-1],
                top5=sums[2].item() / n, per_step_top1=per_step)


def build_parser():
    from .config import checkpoint_parser

    p = checkpoint_parser("tetsnn test", "Evaluate a checkpoint on its test set.")
    p.add_argument("--json", action="store_true", help="print one JSON object: top1, top5, per_step_top1")
    return p


def overrides(args) -> dict:
    """The run's config keys a checkpoint command's flags replace."""
    from .config import CHECKPOINT_OVERRIDES

    given = {key: getattr(args, key) for key in CHECKPOINT_OVERRIDES}
    return {**given, "device": given["device"] or "auto"}   # this machine's, not the run's


def run_test(args) -> dict:
    """Evaluate ``args.checkpoint`` on the test set of its run's config."""
    from .data import build_data
    from .distributed import setup
    from .checkpoint import load_trained_model

    cfg, model, ckpt = load_trained_model(args.checkpoint, overrides(args))
    _, _, device = setup(cfg["device"])
    model = model.to(device)
    data = build_data(cfg, device, train=False)
    res = evaluate(model, data.test, amp=cfg["amp"])
    return dict(top1=res["top1"], top5=res["top5"], per_step_top1=res["per_step_top1"], count=res["count"],
                checkpoint=args.checkpoint, epoch=ckpt.get("epoch"))


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from ..data import DataError
    from ..utils import Interrupted, error_line

    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        res = run_test(args)
    except (ConfigError, CheckpointError, DataError, OSError) as e:
        print(f"tetsnn test: error: {error_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e)
        return 0
    if args.json:
        print(json.dumps({k: res[k] for k in ("top1", "top5", "per_step_top1")}))
        return 0
    print(f"{res['checkpoint']} (epoch {res['epoch']}), {res['count']} test samples")
    print(f"top-1 {100 * res['top1']:.2f}%   top-5 {100 * res['top5']:.2f}%   (time-averaged logits)")
    steps = "  ".join(f"t={t}: {100 * a:.2f}%" for t, a in enumerate(res["per_step_top1"], 1))
    print(f"top-1 using the first t steps: {steps}")
    return 0
