"""A seed's training log: the rows of log.csv (and, optionally, TensorBoard events), the
progress bar or log lines, and the running means between two rows.

The column names of log.csv are declared here and nowhere else: `log_columns` for the
header, `TrainLog.record` for the rows. The training loop (engine.fit) hands it each step
and, at a logged step, what it measured.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

#: the DTNH paper's Angles 1-4 and the angle between g_J and g_Omega (degrees), and whether
#: g_J and g_Omega conflict, on diagnostics rows
ANGLE_COLUMNS = ("angle_d_J", "angle_d_Omega", "angle_sum_J", "angle_sum_Omega", "angle_J_Omega", "conflict")


def log_columns(
    term_names: Sequence[str],
    diagnostic_names: Sequence[str] = (),
    eval_split: str | None = None,
    diagnostics: bool = False,
) -> list[str]:
    """The header of log.csv: `Omega_<term>` per term of Omega, the angles and the terms' own
    diagnostics on diagnostics rows, `<split>_loss`, `<split>_acc` with evaluation rows."""
    columns = [
        "iteration",
        "epoch",
        "lr",
        "loss_J",
        "loss_Omega",
        *(f"Omega_{name}" for name in term_names),
        "train_acc",
    ]
    if diagnostics:
        columns += [*ANGLE_COLUMNS, *diagnostic_names]
    if eval_split is not None:
        columns += [f"{eval_split}_loss", f"{eval_split}_acc"]
    return [*columns, "elapsed_s"]


#: runtime.progress: a tqdm bar on a terminal (auto), always (bar), or log lines (log)
PROGRESS = ("auto", "bar", "log")
#: logger: log.csv alone, or also TensorBoard event files (TrainLog's `tensorboard`)
LOGGERS = ("csv", "tensorboard")


def duration_text(seconds: float) -> str:
    """'45 s', '12 min', '3 h 20 min', '2 d 7 h'."""
    minutes = seconds / 60
    if minutes < 1:
        return f"{seconds:.0f} s"
    if minutes < 60:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(round(minutes), 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def shared_cpu_note(device: torch.device, load: float | None = None, threads: int | None = None) -> str:
    """On the CPU, when the 1-minute load average is above the threads this process computes with
    (other jobs share the cores): a note saying so, since every projection then stretches; else ''."""
    if torch.device(device).type != "cpu":
        return ""
    load = os.getloadavg()[0] if load is None else load
    threads = torch.get_num_threads() if threads is None else threads
    if load <= threads:
        return ""
    return f"; the CPU is shared (load average {load:.1f} over the {threads} threads this job uses): times stretch"


def use_bar(progress: str) -> bool:
    if progress not in PROGRESS:
        raise ValueError(f"runtime.progress={progress!r}; allowed: {', '.join(PROGRESS)}")
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


class TrainLog:
    """Running means of J and the training accuracy since the last row (kept on the device,
    so that a step never waits for the host), and the rows written when asked.

    `path` None writes no file (the rows are still returned by `record`); `tensorboard`, a
    folder, also writes the rows' scalars as TensorBoard events there."""

    def __init__(
        self,
        path: Path | None,
        columns: list[str],
        device: torch.device,
        *,
        total: int,
        desc: str = "train",
        progress: str = "auto",
        tensorboard: Path | None = None,
    ):
        self.path, self.columns, self.total, self.desc, self.tensorboard = path, columns, total, desc, tensorboard
        self.bar_wanted = use_bar(progress)
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps = self.images = 0
        self.writer = self.bar = None
        self.device = torch.device(device)
        self.last: tuple[int, float] | None = None  # the previous row's (iteration, elapsed_s): the pace's window

    # the running window, saved in and restored from a checkpoint
    def window(self) -> dict:
        return {
            "loss": self.loss.detach().cpu(),
            "correct": self.correct.detach().cpu(),
            "steps": self.steps,
            "images": self.images,
        }

    def restore_window(self, window: dict) -> None:
        self.loss += window["loss"].to(self.loss.device)
        self.correct += window["correct"].to(self.correct.device)
        self.steps, self.images = window["steps"], window["images"]

    def open(self, done: int) -> None:
        """Start writing after iteration `done` (0, or the iteration a checkpoint was taken at)."""
        self.writer = _LogWriter(self.path, self.columns, keep_until=done, tensorboard=self.tensorboard)
        self.bar = tqdm(
            total=self.total, initial=done, desc=self.desc, disable=not self.bar_wanted, dynamic_ncols=True, leave=False
        )

    def step(self, loss_J: torch.Tensor, correct: torch.Tensor, images: int) -> None:
        self.loss += loss_J
        self.correct += correct
        self.steps += 1
        self.images += images
        self.bar.update(1)

    def record(
        self,
        iteration: int,
        epoch: int,
        lr: float,
        omega: dict[str, torch.Tensor] | None,
        elapsed_s: float,
        angles: dict[str, float] | None = None,
        diagnostics: dict[str, float] | None = None,
        evaluation: tuple[str, float, float] | None = None,
    ) -> dict:
        """Write the row of `iteration` (means since the previous row; `omega`: each term's value
        at this step; `evaluation`: split, accuracy, loss) and start a new window."""
        row = {
            "iteration": iteration,
            "epoch": epoch,
            "lr": lr,
            "loss_J": float(self.loss) / self.steps,
            "loss_Omega": float(sum(omega.values())) if omega else 0.0,
            **{f"Omega_{name}": float(value) for name, value in (omega or {}).items()},
            "train_acc": 100.0 * float(self.correct) / self.images,
        }
        row.update(angles or {})
        row.update(diagnostics or {})
        if evaluation is not None:
            split, accuracy, loss = evaluation
            row.update({f"{split}_loss": loss, f"{split}_acc": accuracy})
        row["elapsed_s"] = elapsed_s
        self.writer.write(row)
        self.loss.zero_()
        self.correct.zero_()
        self.steps = self.images = 0
        if self.bar.disable:
            log.info(
                f"{self.desc} | iter {iteration}/{self.total} | lr {lr:.2e} | J {row['loss_J']:.4f} "
                f"| Omega {row['loss_Omega']:.4f} | train acc {row['train_acc']:.1f}%{self.pace(iteration, elapsed_s)}"
            )
        else:
            self.bar.set_postfix(J=f"{row['loss_J']:.3f}", lr=f"{lr:.1e}")
        return row

    def pace(self, iteration: int, elapsed_s: float) -> str:
        """' | 0.118 s/it, about 7 s left' over the steps since the previous row (a window that follows a
        machine whose load changes; the first row of a run or a resume has none), with the shared-CPU note."""
        last, self.last = self.last, (iteration, elapsed_s)
        if last is None or iteration <= last[0] or elapsed_s <= last[1]:
            return ""
        rate = (elapsed_s - last[1]) / (iteration - last[0])
        left = (f", about {duration_text(rate * (self.total - iteration))} left") if iteration < self.total else ""
        return f" | {rate:.3g} s/it{left}{shared_cpu_note(self.device)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class _LogWriter:
    """Writes rows to log.csv, flushing each so that a crashed run keeps its curve. A
    resumed run keeps the rows up to `keep_until` (its checkpoint's iteration) and
    drops the later ones, which the resumed run writes again. With `tensorboard` (a
    folder) the same scalars also go to TensorBoard event files there."""

    def __init__(self, path: Path | None, columns: list[str], keep_until: int = 0, tensorboard: Path | None = None):
        self.file = self.board = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(tensorboard), purge_step=keep_until + 1 if keep_until else None)
        if path is None:
            return
        kept = []
        if keep_until and Path(path).exists():
            try:
                with open(path, newline="") as handle:
                    kept = [row for row in csv.DictReader(handle) if int(row["iteration"]) <= keep_until]
            except (ValueError, KeyError, TypeError, csv.Error, UnicodeDecodeError) as error:  # damaged by a crash
                log.warning(
                    "%s is unreadable (%s: %s); its rows before the checkpoint are lost, the rest is written again",
                    path,
                    type(error).__name__,
                    error,
                )
                kept = []
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns, restval="")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.writer.writerow(row)
            self.file.flush()
        if self.board is not None:
            for name, value in row.items():
                if name not in ("iteration", "epoch") and isinstance(value, (int, float)):
                    self.board.add_scalar(name, value, row["iteration"])
            self.board.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
