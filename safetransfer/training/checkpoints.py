"""Training checkpoints, to resume a seed: its training state written every `runtime.checkpoint_every`
iterations (and when SLURM or submitit ask the job to stop), read back by a rerun.

The state is everything the rest of the run depends on: weights, optimizer and
scheduler state, every RNG (Python, NumPy, torch CPU and CUDA, the on-device
augmentation's generator), the iteration, the data order (the sampler's generator as
it was when the epoch began, and how many batches of the epoch were taken) and the
log window. Each image's augmentation is drawn from the sampler's generator (safetransfer.data.draws),
so a resumed run on the CPU ends with exactly the accuracy of an uninterrupted one, with
or without loader workers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safetransfer.common.atomic import atomic_torch_save
from safetransfer.common.errors import StorageError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """random.setstate needs tuples where a save may have produced lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash or a full disk leaves the previous checkpoint as it was."""
    try:
        atomic_torch_save(state, path)
    except (OSError, StorageError) as error:
        reason = error.strerror if isinstance(error, OSError) else error.reason
        raise StorageError(
            f"writing the checkpoint {path} failed ({reason}); the previous checkpoint "
            "is kept: free space in the run directory and rerun the same command to continue"
        ) from None


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The state saved at `path` by this same config, or None. A file that cannot be read
    (truncated, damaged) is set aside as `<name>.damaged` and the seed starts over."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, unpickling error, ...
        damaged = path.with_name(path.name + ".damaged")
        path.replace(damaged)
        log.warning(
            "the checkpoint %s cannot be read (%s: %s); moved to %s, the seed starts from iteration 0",
            path,
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
            damaged,
        )
        return None
    if state.get("key") != key:
        log.warning("the checkpoint %s belongs to another config; the seed starts from iteration 0", path)
        return None
    return state


@dataclass
class TrainingState:
    """What a checkpoint holds: all a seed needs to go on exactly where it stopped."""

    key: str  # the config's key: a checkpoint of another config is not resumed
    iteration: int  # the last iteration done
    model: dict  # state_dicts
    optimizer: dict
    scheduler: dict
    position: dict  # the data order (engine.Batches.position)
    rng: dict  # every global RNG (rng_state)
    augment: torch.Tensor | None  # the on-device augmentation's generator state
    window: dict  # the log row being accumulated (train_log.TrainLog.window)
    elapsed_s: float  # training time so far

    def as_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


class Checkpointer:
    """Saves a seed's TrainingState to `path` every `every` iterations (0: only when asked to
    stop), and loads it back for a rerun of the same config (`key`)."""

    def __init__(self, path: Path, key: str, every: int = 0):
        self.path, self.key, self.every = Path(path), key, every

    def load(self) -> TrainingState | None:
        state = load_checkpoint(self.path, self.key)
        if state is None:
            return None
        try:
            return TrainingState(**state)
        except TypeError:  # other fields: written by another version of safetransfer
            log.warning("the checkpoint %s was written by another version; the seed starts from iteration 0", self.path)
            return None

    def due(self, iteration: int, stopping: bool) -> bool:
        return stopping or bool(self.every and iteration % self.every == 0)

    def save(self, state: TrainingState) -> None:
        save_checkpoint(self.path, state.as_dict())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
