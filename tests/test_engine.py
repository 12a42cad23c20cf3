"""The training step, the iteration loop and determinism of a seed."""

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from safetransfer.backbones import TransferNet
from safetransfer.directions import Sum
from safetransfer.engine import training_step
from safetransfer.experiment import create_optimizer, prepare_data, run_seed
from safetransfer.regularizers import Omega
from safetransfer.regularizers.l2 import L2
from safetransfer.targets.demo import DemoTarget

from conftest import TINY


def test_sum_step_with_l2_equals_sgd_with_weight_decay():
    """d = g_J + alpha w is exactly what torch's SGD weight decay computes."""
    torch.manual_seed(0)
    ours = TransferNet("resnet18", 5).double()
    reference = copy.deepcopy(ours)
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    alpha, lr = 0.01, 0.05

    params = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    omega = Omega({"l2": L2(alpha)})
    omega.bind(ours)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9, weight_decay=alpha)
    for _ in range(2):  # the second step exercises the momentum buffer
        step = training_step(ours, images, labels, omega, Sum(), optimizer, params)
        ref_optimizer.zero_grad()
        ref_loss = F.cross_entropy(reference(images)[0], labels)
        ref_loss.backward()
        ref_optimizer.step()
        assert float(step.loss_J) == pytest.approx(float(ref_loss), rel=1e-10)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def test_head_learns_ten_times_faster(compose_cfg):
    cfg = compose_cfg()
    model = TransferNet("resnet18", 3)
    optimizer, scheduler = create_optimizer(cfg, model)
    backbone_group, head_group = optimizer.param_groups
    assert backbone_group["lr"] == pytest.approx(0.01) and head_group["lr"] == pytest.approx(0.1)
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    assert backbone_group["weight_decay"] == 0
    for _ in range(6000):
        optimizer.step()
        scheduler.step()
    assert backbone_group["lr"] == pytest.approx(0.001) and head_group["lr"] == pytest.approx(0.01)


def _run(cfg, seed, directory):
    target = DemoTarget(train_images_per_class=10, test_images_per_class=4, sampling_rate=50)
    data = prepare_data(cfg, target)
    return run_seed(cfg, seed, data, None, directory)


def _log(directory, seed):
    with open(directory / f"seed_{seed}" / "log.csv") as handle:
        return list(csv.DictReader(handle))


def test_same_config_and_seed_give_the_same_accuracy(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "train.iterations=4", "optim.scheduler.milestones=[3]")
    first = _run(cfg, 3, tmp_path / "a")
    again = _run(cfg, 3, tmp_path / "b")
    other = _run(cfg, 4, tmp_path / "c")
    assert first["top1"] == again["top1"] and first["test_loss"] == again["test_loss"]
    rows_a, rows_b = _log(tmp_path / "a", 3), _log(tmp_path / "b", 3)
    assert [r["loss_J"] for r in rows_a] == [r["loss_J"] for r in rows_b]
    assert [r["loss_J"] for r in rows_a] != [r["loss_J"] for r in _log(tmp_path / "c", 4)]
    assert other["test_loss"] != first["test_loss"]


def test_log_rows_and_metrics(compose_cfg, tmp_path):
    cfg = compose_cfg(*TINY, "train.iterations=5", "runtime.log_every=2", "optim.scheduler.milestones=[3]")
    metrics = _run(cfg, 0, tmp_path)
    rows = _log(tmp_path, 0)
    assert [int(r["iteration"]) for r in rows] == [2, 4, 5]  # every 2 iterations, and the last
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01, 0.001, 0.001])
    assert set(rows[0]) >= {"iteration", "lr", "loss_J", "loss_Omega", "train_acc"}
    assert all(0 <= float(r["train_acc"]) <= 100 for r in rows)
    assert metrics["iterations"] == 5 and metrics["seed"] == 0
    assert metrics["test_images"] == 6 * 4 and metrics["train_images"] == 6 * 5
    assert metrics["config"]["train"]["iterations"] == 5
    assert 0 <= metrics["top1"] <= 100
