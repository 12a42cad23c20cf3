"""The finiteness guard (safetransfer.training.finite): a NaN at step k leaves the weights of
step k-1, is reported at the next log row naming step k, and on the deferred path (CUDA's)
nothing is read back from the device between rows. Both paths are run here on the CPU."""

import functools

import pytest
import torch
from torch.utils.data import DataLoader

from safetransfer.data.datasets import TensorImages
from safetransfer.data.draws import Seeded, SeededDraws
from safetransfer.training import engine
from safetransfer.training.directions import DTNH
from safetransfer.training.engine import Loop, Parts, fit
from safetransfer.training.finite import FiniteGuard, NonFiniteError
from safetransfer.training.regularizers import BindContext, Omega
from safetransfer.training.regularizers.base import Term
from tiny import tiny_resnet


class PoisonFrom(Term):
    """alpha * mean squared pooled feature, NaN from its `at`-th evaluation on (a step's forward pass is one)."""

    def __init__(self, at: int):
        super().__init__()
        self.alpha, self.at, self.calls = 0.5, at, 0

    def value(self, model, features):
        self.calls += 1
        return self.alpha * features.pooled.pow(2).mean() * (float("nan") if self.calls >= self.at else 1.0)


CPU = torch.device("cpu")


def parts(poison_at: int | None, device: torch.device = CPU) -> Parts:
    torch.manual_seed(0)
    model = tiny_resnet(3).to(device)
    images = torch.rand(16, 3, 12, 12)
    labels = torch.arange(16) % 3
    omega = Omega({"poison": PoisonFrom(poison_at if poison_at is not None else 10**9)})
    omega.bind(model, BindContext(device=device))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[100])
    loader = DataLoader(
        Seeded(TensorImages(images, labels)),
        sampler=SeededDraws(16, torch.Generator().manual_seed(0)),
        batch_size=4,
        drop_last=True,
    )
    return Parts(model, omega, DTNH(), optimizer, scheduler, loader, device)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("deferred", [True, False])
def test_a_nan_at_step_k_leaves_the_weights_of_step_k_minus_1_and_is_reported_at_the_next_row(monkeypatch, deferred):
    monkeypatch.setattr(engine, "FiniteGuard", functools.partial(FiniteGuard, deferred=deferred))
    reference = parts(None)
    fit(reference, Loop(iterations=2, log_every=0))  # two clean steps: the weights after iteration 2
    poisoned = parts(poison_at=3)
    with pytest.raises(NonFiniteError) as caught:
        fit(poisoned, Loop(iterations=8, log_every=4))
    message = str(caught.value)
    assert "iteration 3 (epoch 0): Omega term poison is nan (alpha=0.5" in message
    assert "seen at iteration 4" in message and "\n" not in message
    expected, got = state(reference.model), state(poisoned.model)
    assert expected.keys() == got.keys()
    for name in expected:  # parameters and BatchNorm statistics, bit for bit
        assert torch.equal(expected[name], got[name]), name
    assert all(torch.isfinite(t).all() for t in got.values() if t.is_floating_point())


def test_the_deferred_guard_reads_nothing_back_between_log_rows(monkeypatch):
    """Reads of a tensor's value (bool, float, item) counted over whole runs of 2 and 4 steps
    (one epoch: the loader draws its workers' seed once an epoch), logged at the last step only:
    on the deferred path their number does not grow with the steps (all of them are at the last
    row); on the host path it does (two reads a step)."""
    reads = {"count": 0}

    def counting(method):
        original = getattr(torch.Tensor, method)

        def read(self, *args):
            reads["count"] += 1
            return original(self, *args)

        return read

    def reads_in(iterations: int, deferred: bool) -> int:
        guard = functools.partial(FiniteGuard, deferred=deferred)
        built = parts(None)
        with monkeypatch.context() as patch:
            patch.setattr(engine, "FiniteGuard", guard)
            for method in ("__bool__", "__float__", "item"):
                patch.setattr(torch.Tensor, method, counting(method))
            reads["count"] = 0
            fit(built, Loop(iterations=iterations, log_every=0))
            return reads["count"]

    assert reads_in(2, deferred=True) == reads_in(4, deferred=True)
    assert reads_in(4, deferred=False) == reads_in(2, deferred=False) + 4


def test_the_verdict_is_false_for_a_nan_or_inf_anywhere_in_j_or_d():
    d = [torch.ones(3), torch.ones(2, 2)]
    assert bool(FiniteGuard.verdict(torch.tensor(1.0), d))
    assert not bool(FiniteGuard.verdict(torch.tensor(float("nan")), d))
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [t.clone() for t in d]
        broken[1][1, 0] = bad
        assert not bool(FiniteGuard.verdict(torch.tensor(1.0), broken))
