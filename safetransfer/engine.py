"""The training engine: one step of DTNH Algorithm 1, the iteration loop, evaluation.

Nothing here knows about Hydra; experiment.py builds the pieces from a config.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from safetransfer.backbones import TransferNet
from safetransfer.directions import Direction
from safetransfer.regularizers import Omega

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked for; fp32 otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(model: TransferNet, images: torch.Tensor, labels: torch.Tensor, omega: Omega,
                  direction: Direction, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                  precision_context) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of Algorithm 1; returns the detached J and the number of correct predictions."""
    with precision_context:
        logits, features = model(images)
        loss_J = F.cross_entropy(logits, labels)
        omega_autograd = omega.autograd_value(model, features)

    # estimate g_J and g_Omega at the same weights, on the same mini-batch
    if direction.needs_both_gradients:
        g_J = _grad(loss_J, params, retain_graph=omega_autograd is not None)
        g_Omega = _grad(omega_autograd, params) if omega_autograd is not None else [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            omega.add_closed_form_gradient(params, g_Omega)
            d = direction(g_J, g_Omega)
    else:
        # d = g_J + g_Omega: one backward pass of J + Omega gives the sum directly
        total = loss_J if omega_autograd is None else loss_J + omega_autograd
        d = _grad(total, params)
        with torch.no_grad():
            omega.add_closed_form_gradient(params, d)

    # step along d
    for p, d_p in zip(params, d):
        p.grad = d_p
    optimizer.step()
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return loss_J.detach(), correct


def _grad(value: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def endless(loader: DataLoader) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(epoch, batch) pairs for as long as asked: training is iteration-based."""
    epoch = 0
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1


def use_bar(progress: str) -> bool:
    if progress not in ("auto", "bar", "log"):
        raise ValueError(f"runtime.progress={progress!r}; allowed: auto, bar, log")
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


def fit(model: TransferNet, loader: DataLoader, omega: Omega, direction: Direction,
        optimizer: torch.optim.Optimizer, scheduler, *, iterations: int, device: torch.device,
        precision: str = "fp32", log_every: int = 100, progress: str = "auto", log_path: Path | None = None,
        desc: str = "train") -> list[dict]:
    """Train for `iterations` steps; every `log_every` steps append a row to log.csv.

    Returns the logged rows. loss_J and train_acc are means over the steps since the
    previous row; loss_Omega and its terms are the values at the logged step.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    precision_context = autocast(device, precision)
    rows: list[dict] = []
    window_loss = torch.zeros((), device=device)
    window_correct = torch.zeros((), device=device, dtype=torch.long)
    window_steps = window_images = 0
    current_epoch = -1
    bar = tqdm(total=iterations, desc=desc, disable=not use_bar(progress), dynamic_ncols=True, leave=False)
    writer = _LogWriter(log_path)
    start = time.perf_counter()
    batches = endless(loader)
    for iteration in range(1, iterations + 1):
        epoch, (images, labels) = next(batches)
        if epoch != current_epoch:
            current_epoch = epoch
            omega.set_epoch(epoch)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loss_J, correct = training_step(model, images, labels, omega, direction, optimizer, params,
                                        precision_context)
        scheduler.step()
        window_loss += loss_J
        window_correct += correct
        window_steps += 1
        window_images += len(labels)
        bar.update(1)
        if (log_every and iteration % log_every == 0) or iteration == iterations:
            with precision_context:
                terms = omega.values(model, None)
            row = {
                "iteration": iteration,
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "loss_J": float(window_loss) / window_steps,
                "loss_Omega": sum(terms.values()),
                **{f"Omega_{name}": value for name, value in terms.items()},
                "train_acc": 100.0 * float(window_correct) / window_images,
                "elapsed_s": time.perf_counter() - start,
            }
            if not math.isfinite(row["loss_J"]):
                raise FloatingPointError(f"{desc}: the empirical loss J is {row['loss_J']} at iteration {iteration}")
            rows.append(row)
            writer.write(row)
            window_loss.zero_()
            window_correct.zero_()
            window_steps = window_images = 0
            message = (f"{desc} | iter {iteration}/{iterations} | lr {row['lr']:.2e} | J {row['loss_J']:.4f} "
                       f"| Omega {row['loss_Omega']:.4f} | train acc {row['train_acc']:.1f}%")
            if bar.disable:
                log.info(message)
            else:
                bar.set_postfix(J=f"{row['loss_J']:.3f}", lr=f"{row['lr']:.1e}")
    bar.close()
    writer.close()
    return rows


class _LogWriter:
    """Appends rows to log.csv, flushing each so that a crashed run keeps its curve."""

    def __init__(self, path: Path | None):
        self.path, self.file, self.writer = path, None, None

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        if self.writer is None:
            self.file = open(self.path, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@torch.no_grad()
def evaluate(model: TransferNet, loader: DataLoader, device: torch.device, precision: str = "fp32") -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy over the whole loader."""
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    with autocast(device, precision):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits, _ = model(images)
            total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            correct += (logits.argmax(dim=1) == labels).sum()
            count += len(labels)
    model.train()
    return 100.0 * float(correct) / count, float(total_loss) / count
