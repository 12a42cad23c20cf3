"""The training engine: one step of DTNH Algorithm 1, the iteration loop, evaluation.

Nothing here knows about Hydra: safetransfer.job.build makes the Parts from a config. The loop
hands its rows to a train_log.TrainLog and its state to a checkpoints.Checkpointer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from safetransfer.common.atomic import atomic_write_json
from safetransfer.common.registry import register
from safetransfer.common.signals import Preempted, StopSignals
from safetransfer.training.backbones import TransferNet
from safetransfer.training.checkpoints import Checkpointer, TrainingState, rng_state, set_rng_state
from safetransfer.training.directions import Direction
from safetransfer.training.finite import FiniteGuard, NonFiniteError, verdict
from safetransfer.training.regularizers import Omega
from safetransfer.training.train_log import TrainLog

log = logging.getLogger(__name__)


#: train.precision's choices, declared where they are implemented: the autocast dtype of each
#: (None: no autocast). checks.py refuses anything else; fp16 would need a gradient scaler.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked for; fp32 otherwise."""
    dtype = PRECISIONS[precision]
    if dtype is not None and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    loss_J: torch.Tensor  # detached, on the device
    correct: torch.Tensor  # number of correct predictions in the batch
    omega: dict[str, torch.Tensor] | None = None  # each term's value, when recorded
    angles: dict[str, torch.Tensor] | None = None  # logs.ANGLE_COLUMNS, when recorded


def training_step(
    model: TransferNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    omega: Omega,
    direction: Direction,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    precision_context=None,
    record: bool = False,
    angles: bool = False,
    guard: FiniteGuard | None = None,
    views: tuple[torch.Tensor, ...] = (),
    indices: torch.Tensor | None = None,
) -> StepResult:
    """One iteration of DTNH Algorithm 1.

    `record` also returns each term's value; `angles` also returns the angles between
    d, g_J and g_Omega (which makes a `sum` step compute g_J and g_Omega apart too).
    `guard` (finite.FiniteGuard) skips the update when J or d is NaN or infinite, and remembers the step.
    `views`: other augmented views of the batch, for a term that reads them (Bi-Tuning's key view);
    `indices`: the batch's items in the training set, for a term that keeps something per item.
    """
    if guard is not None:
        guard.hold()
    with precision_context or contextlib.nullcontext():
        logits, features = model(images)
        features.labels, features.views, features.indices = labels, views, indices
        loss_J = F.cross_entropy(logits, labels)
        feature_terms = omega.autograd_values(model, features)
    omega_autograd = torch.stack(list(feature_terms.values())).sum() if feature_terms else None

    # estimate g_J and g_Omega at the same weights, on the same mini-batch, and choose d
    if direction.needs_both_gradients or angles:
        g_J = _grad(loss_J, params, retain_graph=omega_autograd is not None)
        g_Omega = _grad(omega_autograd, params) if omega_autograd is not None else direction.zero_gradient(params)
        omega.add_closed_form_gradient(params, g_Omega)
        with torch.no_grad():
            # the direction may build d in g_J's storage: keep a copy when the angles need g_J
            d = direction([g.clone() for g in g_J] if angles else g_J, g_Omega)
    else:
        # d = g_J + g_Omega: one backward pass of J + Omega gives the sum directly
        d = _grad(loss_J if omega_autograd is None else loss_J + omega_autograd, params)
        omega.add_closed_form_gradient(params, d)

    result = StepResult(loss_J.detach(), (logits.detach().argmax(dim=1) == labels).sum())
    if record:  # at the weights the gradients were taken at, before the step
        values = {name: value.detach() for name, value in feature_terms.items()}
        values.update(omega.closed_form_values(model))
        result.omega = {name: values[name] for name in omega.terms}
    if angles:
        result.angles = angle_diagnostics(g_J, g_Omega, d)

    # step along d (never along a non-finite d: the guard skips it, and the loop reports it at its next row)
    for p, d_p in zip(params, d):
        p.grad = d_p
    if guard is None:
        optimizer.step()
    else:
        guard.step(optimizer, guard.verdict(loss_J, d), images, labels)
    return result


def term_problem(omega: Omega, name: str, value: float) -> str:
    """`Omega term l2sp is inf (alpha=0.1, decay^epoch=1)`: the term, its value and its coefficients."""
    term = omega.terms[name]
    coefficients = ", ".join(
        [*(f"{n}={v:g}" for n, v in term.coefficient_values().items()), f"decay^epoch={term.scale:g}"]
    )
    return f"Omega term {name} is {value} ({coefficients})"


def diagnose_nonfinite(
    model: TransferNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    omega: Omega,
    params: Sequence[torch.nn.Parameter],
    precision_context=None,
) -> str:
    """Which of J, the terms of Omega and their gradients is not finite, at the current weights."""

    def finite(tensors) -> bool:  # the guard's test: every element finite and each tensor's norm within range
        return all(bool(torch.isfinite(t).all()) for t in tensors) and bool(
            verdict(torch.zeros(()), [t.float() for t in tensors])
        )

    with precision_context or contextlib.nullcontext():
        logits, features = model(images)
        features.labels = labels
        loss_J = F.cross_entropy(logits, labels)
        values = omega.autograd_values(model, features)
    values.update(omega.closed_form_values(model))
    problems = [] if finite([loss_J]) else [f"the empirical loss J is {float(loss_J)}"]
    problems += [term_problem(omega, name, float(v.detach())) for name, v in values.items() if not finite([v])]
    if problems:
        return "; ".join(problems)
    if not finite(_grad(loss_J, params, retain_graph=True)):
        return "the gradient of the empirical loss J is not finite"
    for name, term in omega.terms.items():
        if term.closed_form:
            grads = [torch.zeros_like(p) for p in params]
            term.add_gradient(params, grads)
        else:
            grads = _grad(values[name], params, retain_graph=True)
        if not finite(grads):
            return f"the gradient of {term_problem(omega, name, 'not finite or beyond float32 range')}"
    return "the direction d is not finite (or beyond float32 range) although J, Omega and their gradients are"


@torch.no_grad()
def angle_diagnostics(
    g_J: list[torch.Tensor], g_Omega: list[torch.Tensor], d: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The DTNH paper's Angles 1-4 in degrees (all parameters as one vector), the angle
    between g_J and g_Omega, and whether they conflict (<g_J, g_Omega> < 0). When they do,
    DTNH removes the part of g_Omega along g_J: cos^2 of that angle of ||g_Omega||^2.

    Each angle is 2 atan2(|u - v|, |u + v|) of the unit vectors u, v, with every sum (dot
    products, norms) accumulated in float64: arccos of the cosine loses all precision near
    0 degrees (float32 arccos put Angle 1 above Angle 3 at 0.1-0.5 degrees, although they are
    the same angle when nothing conflicts). The elementwise differences stay in the
    gradients' precision (about 1e-5 degrees in float32), which keeps a diagnostics row a
    fraction of a step's cost instead of several steps'."""
    vectors = {"J": g_J, "O": g_Omega, "D": d, "S": [a + b for a, b in zip(g_J, g_Omega)]}  # S: the plain sum
    norms = {name: sum64(t.square() for t in v).sqrt() for name, v in vectors.items()}
    pairs = {
        "angle_d_J": ("D", "J"),
        "angle_d_Omega": ("D", "O"),  # Angles 1 and 2
        "angle_sum_J": ("S", "J"),
        "angle_sum_Omega": ("S", "O"),  # Angles 3 and 4
        "angle_J_Omega": ("J", "O"),
    }
    angles = {}
    for column, (a, b) in pairs.items():
        na, nb = (norms[n].to(g_J[0].dtype).clamp_min(torch.finfo(g_J[0].dtype).tiny) for n in (a, b))
        apart = sum64((x / na - y / nb).square() for x, y in zip(vectors[a], vectors[b]))
        along = sum64((x / na + y / nb).square() for x, y in zip(vectors[a], vectors[b]))
        angle = torch.rad2deg(2 * torch.atan2(apart.sqrt(), along.sqrt()))
        angles[column] = torch.where((norms[a] > 0) & (norms[b] > 0), angle, torch.zeros_like(angle))
    return {**angles, "conflict": (sum64(j * o for j, o in zip(g_J, g_Omega)) < 0).double()}


def sum64(terms) -> torch.Tensor:
    """The sum of all elements of all the tensors, accumulated in float64."""
    return torch.stack([t.sum(dtype=torch.float64) for t in terms]).sum()


def _grad(value: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class Batches:
    """(epoch, batch) pairs for as long as asked: training is iteration-based. Its
    position (epoch, batches taken in it, and the sampler's generator state when the
    epoch began) can be saved and restored, which replays the same data order."""

    def __init__(self, loader: DataLoader):
        self.loader, self.epoch, self.taken = loader, 0, 0
        self.generator = getattr(loader.sampler, "generator", None) or loader.generator
        self.epoch_start = None
        self._batches: Iterator | None = None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        while True:
            if self._batches is None:
                self.epoch_start = self.generator.get_state() if self.generator is not None else None
                self._batches, self.taken = iter(self.loader), 0
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches, self.epoch = None, self.epoch + 1
                continue
            self.taken += 1
            return self.epoch, batch

    def indices(self, batch_size: int) -> torch.Tensor:
        """The training items in the batch just taken (their positions in the training set), read from the
        epoch's order (data.draws.SeededDraws), for a term that keeps something per item (LwF's cached logits)."""
        start = (self.taken - 1) * batch_size
        return torch.tensor(self.loader.sampler.order[start : start + batch_size])

    def position(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken, "epoch_start": self.epoch_start}

    def restore(self, position: dict) -> None:
        """Continue after the batch the position was taken at (the batches before it are loaded again and dropped)."""
        self.epoch = position["epoch"]
        if position["epoch_start"] is not None:
            self.generator.set_state(position["epoch_start"])
        self.epoch_start = position["epoch_start"]
        self._batches = iter(self.loader)
        for _ in range(position["taken"]):
            next(self._batches)
        self.taken = position["taken"]


@dataclass
class Parts:
    """What the loop steps: built from a config by safetransfer.job.build (or by hand)."""

    model: TransferNet
    omega: Omega
    direction: Direction
    optimizer: torch.optim.Optimizer
    scheduler: Any  # stepped once per iteration
    loader: DataLoader  # the training batches
    device: torch.device
    batch_transform: Any = None  # finishes each batch on the device (DeviceAugment), or None


@dataclass
class Loop:
    """How long the loop runs and what it records. Rows of log.csv come every `log_every`
    iterations and at the last; rows at multiples of `diagnostics_every` also carry the
    angles between d, g_J and g_Omega and the terms' own diagnostics (BSS's singular values);
    rows at multiples of `eval_every` also carry `<split>_loss` and `<split>_acc`."""

    iterations: int
    precision: str = "fp32"
    log_every: int = 100
    diagnostics_every: int = 0
    eval_every: int = 0
    check_finite: bool = True  # a finite.FiniteGuard skips non-finite steps; reported at the next log row
    #: called once with (seconds per iteration, iterations left) when PACE_STEPS steps after the
    #: first have been timed (the first is left out: it warms up caches and kernels)
    on_pace: Callable[[float, int], None] | None = None


PACE_STEPS = 4


def milestone_iterations(milestones, iterations: int) -> list[int]:
    """optim.scheduler.milestones as iterations: a number in (0, 1) is a fraction of the run
    (0.75 of 8,000: 6,000), anything else an iteration (the papers' presets: 6000)."""
    return [max(1, round(m * iterations)) if 0 < m < 1 else int(m) for m in milestones]


def fit(
    parts: Parts,
    loop: Loop,
    logger: TrainLog | None = None,
    checkpointer: Checkpointer | None = None,
    evaluator: Evaluator | None = None,
    stop: StopSignals | None = None,
) -> list[dict]:
    """Train for `loop.iterations` steps of DTNH Algorithm 1; returns the rows logged by this call.

    loss_J and train_acc of a row are means over the steps since the previous row; lr is the
    one the row's step used; loss_Omega and its terms are the values at the row's step.
    `logger` (train_log.TrainLog) writes the rows (without it they are only returned and logged); `evaluator` (the
    validation split when there is one, else the test split) gives the evaluation columns.
    `checkpointer` (checkpoints.Checkpointer) saves the training state at its interval and, when
    it holds the state of an interrupted run, the loop continues from it. A stop request
    (`stop`, resume.StopSignals) saves the state after the current step and raises Preempted.
    """
    model, omega, optimizer, scheduler = parts.model, parts.omega, parts.optimizer, parts.scheduler
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    precision_context = autocast(parts.device, loop.precision)
    channels_last = (
        params[0].dim() == 4
        and params[0].is_contiguous(memory_format=torch.channels_last)
        and not params[0].is_contiguous()
    )  # the network was converted: feed it NHWC batches
    eval_split = evaluator.split if evaluator is not None and loop.eval_every else None
    logger = logger or TrainLog(None, [], parts.device, total=loop.iterations, progress="log")
    rows: list[dict] = []
    current_epoch, done, elapsed = -1, 0, 0.0
    batches = Batches(parts.loader)
    state = checkpointer.load() if checkpointer is not None else None
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        batches.restore(state.position)
        if parts.batch_transform is not None and state.augment is not None:
            parts.batch_transform.generator.set_state(state.augment)
        logger.restore_window(state.window)
        done, elapsed = state.iteration, state.elapsed_s
        set_rng_state(state.rng)  # after the replayed batches, which drew from it
        log.info("%s: resumed after iteration %d of %d", logger.desc, done, loop.iterations)
    guard = FiniteGuard(model, parts.device) if loop.check_finite else None
    if guard is not None:
        guard.start(done)
    logger.open(done)
    start = time.perf_counter()
    paced_from = None  # when the first step of this call ended
    needs_indices = omega.needs_indices  # a term reads the batch's items (LwF's cached logits)

    def verify(iteration: int) -> None:
        """Raise NonFiniteError when a step up to `iteration` was not finite (the guard skipped its update)."""
        failure = guard.failure() if guard is not None else None
        if failure is None:
            return
        omega.set_epoch(failure.epoch)  # say what is not finite at the failing step's weights, batch and epoch
        problem = diagnose_nonfinite(model, failure.images, failure.labels, omega, params, precision_context)
        guard.put_back()
        seen = "" if iteration == failure.iteration else f"; seen at iteration {iteration}"
        raise NonFiniteError(
            f"{logger.desc}: iteration {failure.iteration} (epoch {failure.epoch}): {problem} "
            f"(no update was made from it on{seen})"
        )

    def save(iteration: int) -> None:
        verify(iteration)  # never checkpoint a failed run
        checkpointer.save(
            TrainingState(
                key=checkpointer.key,
                iteration=iteration,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                position=batches.position(),
                rng=rng_state(),
                augment=parts.batch_transform.generator.get_state() if parts.batch_transform is not None else None,
                window=logger.window(),
                elapsed_s=elapsed + time.perf_counter() - start,
            )
        )

    try:
        for iteration in range(done + 1, loop.iterations + 1):
            epoch, (images, labels) = next(batches)
            if epoch != current_epoch:
                current_epoch = epoch
                omega.set_epoch(epoch)
                if guard is not None:
                    guard.set_epoch(epoch)
            logged = (loop.log_every and iteration % loop.log_every == 0) or iteration == loop.iterations
            diagnosed = logged and bool(loop.diagnostics_every) and iteration % loop.diagnostics_every == 0
            lr = optimizer.param_groups[0]["lr"]
            images = images.to(parts.device, non_blocking=True)
            if parts.batch_transform is not None:
                images = parts.batch_transform(images)
            views = ()
            if images.dim() == 5:  # several augmented views of each image (Term.views): the network sees the first
                images, *views = images.unbind(1)
            if channels_last:
                images, *views = (v.contiguous(memory_format=torch.channels_last) for v in (images, *views))
            step = training_step(
                model,
                images,
                labels.to(parts.device, non_blocking=True),
                omega,
                parts.direction,
                optimizer,
                params,
                precision_context,
                record=logged,
                angles=diagnosed,
                guard=guard,
                views=tuple(views),
                indices=batches.indices(len(labels)).to(parts.device) if needs_indices else None,
            )
            scheduler.step()
            logger.step(step.loss_J, step.correct, len(labels))
            if logged:
                verify(iteration)
                values = {name: float(value) for name, value in (step.omega or {}).items()}
                bad = [name for name in omega.terms if not math.isfinite(values[name])]
                if loop.check_finite and bad:  # a term whose value (not only its gradient) overflowed
                    raise NonFiniteError(
                        f"{logger.desc}: iteration {iteration} (epoch {epoch}): "
                        + "; ".join(term_problem(omega, name, values[name]) for name in bad)
                    )
                evaluation = None
                if eval_split is not None and iteration % loop.eval_every == 0:
                    evaluation = (eval_split, *evaluator())
                rows.append(
                    logger.record(
                        iteration,
                        epoch,
                        lr,
                        step.omega,
                        elapsed + time.perf_counter() - start,
                        angles={name: float(value) for name, value in step.angles.items()} if diagnosed else None,
                        diagnostics=omega.diagnostics() if diagnosed else None,
                        evaluation=evaluation,
                    )
                )
            if loop.on_pace is not None:
                if iteration == done + 1:
                    paced_from = time.perf_counter()
                elif iteration == done + 1 + PACE_STEPS and iteration < loop.iterations:
                    loop.on_pace((time.perf_counter() - paced_from) / PACE_STEPS, loop.iterations - iteration)
            signum = stop.requested if stop is not None else None
            if (
                checkpointer is not None
                and iteration < loop.iterations
                and checkpointer.due(iteration, signum is not None)
            ):
                save(iteration)
            if signum is not None and iteration < loop.iterations:
                verify(iteration)  # a failed seed is recorded as failed, not as stopped
                raise Preempted(signum, iteration, checkpointer.path if checkpointer is not None else None)
    finally:
        logger.close()
    return rows


@dataclass
class Evaluator:
    """Top-1 and loss of the model on one split, during training (runtime.eval_every)."""

    split: str  # "test" or "val": the log.csv columns are <split>_loss, <split>_acc
    model: TransferNet
    loader: DataLoader
    device: torch.device
    precision: str = "fp32"
    batch_transform: object = None

    def __call__(self) -> tuple[float, float]:
        return evaluate(self.model, self.loader, self.device, self.precision, self.batch_transform)


def test_forward(model: TransferNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and pooled features of a test batch; a batch of several views per image
    (B, views, 3, H, W), as data.test_crops=10 gives, is scored by the views' mean logits
    (the BSS authors' code sums them: the same prediction) and mean pooled features."""
    if images.dim() == 4:
        logits, features = model(images)
        return logits, features.pooled
    batch, views = images.shape[:2]
    logits, features = model(images.flatten(0, 1))
    return logits.view(batch, views, -1).mean(1), features.pooled.view(batch, views, -1).mean(1)


@torch.no_grad()
def evaluate(
    model: TransferNet, loader: DataLoader, device: torch.device, precision: str = "fp32", batch_transform=None
) -> tuple[float, float]:
    """Top-1 accuracy (%) and mean cross-entropy over the whole loader."""
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    with autocast(device, precision):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if batch_transform is not None:
                images = batch_transform(images)
            labels = labels.to(device, non_blocking=True)
            logits, _ = test_forward(model, images)
            total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            correct += (logits.argmax(dim=1) == labels).sum()
            count += len(labels)
    model.train()
    return 100.0 * float(correct) / count, float(total_loss) / count


@torch.no_grad()
def save_spectrum(
    path: Path, model: TransferNet, loader: DataLoader, device: torch.device, batches: int, batch_transform=None
) -> None:
    """The singular values (descending) of the pooled feature matrix of each of the first
    `batches` test batches (fixed: the test loader is not shuffled), as in the BSS paper's analysis."""
    if batches <= 0:
        return
    model.eval()
    spectra = []
    for index, (images, _) in enumerate(loader):
        if index == batches:
            break
        images = images.to(device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images)
        pooled = test_forward(model, images)[1].double()
        spectra.append(torch.linalg.svdvals(pooled).cpu().tolist())
    model.train()
    atomic_write_json(path, {"batch_size": loader.batch_size, "split": "test", "singular_values": spectra})


register("optimizer", "sgd")(torch.optim.SGD)
register("scheduler", "multistep")(torch.optim.lr_scheduler.MultiStepLR)
