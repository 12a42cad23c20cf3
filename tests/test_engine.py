"""The training step, the iteration loop and determinism of a seed."""

import copy
import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from safetransfer.data.preparation import prepare_data
from safetransfer.data.targets.demo import DemoTarget
from safetransfer.job.build import create_optimizer
from safetransfer.job.run import run_seed
from safetransfer.training.backbones import TransferNet
from safetransfer.training.directions import Sum
from safetransfer.training.engine import training_step
from safetransfer.training.regularizers import Omega
from safetransfer.training.regularizers.l2 import L2
from tiny import tiny_resnet


def test_sum_step_with_l2_equals_sgd_with_weight_decay():
    """d = g_J + alpha w is exactly what torch's SGD weight decay computes."""
    torch.manual_seed(0)
    ours = tiny_resnet(5).double()  # the maths does not depend on the network's size
    reference = copy.deepcopy(ours)
    images = torch.randn(6, 3, 16, 16, dtype=torch.float64)
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
        assert float(step.loss_J.detach()) == pytest.approx(ref_loss.item(), rel=1e-10)
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


def _run(cfg, seed, directory, val_fraction=0.0):
    target = DemoTarget(train_images_per_class=10, test_images_per_class=4, sampling_rate=50, val_fraction=val_fraction)
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


def flat_settings(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _manual_dtnh(g_J, g_Omega):
    J, O = flat_settings(g_J), flat_settings(g_Omega)
    if J @ O < 0:
        O = O - (J @ O) / (J @ J) * J
    return J + O


@pytest.mark.parametrize("regularizer", ["l2sp", "knowdist"])
def test_dtnh_step_matches_a_manual_algorithm_1(regularizer):
    """One DTNH step from the engine equals g_J and g_Omega taken apart by hand, projected
    on flat vectors, and one plain SGD step (first momentum step: buffer = d)."""
    from safetransfer.training.directions import DTNH
    from safetransfer.training.regularizers import BindContext
    from safetransfer.training.regularizers.knowdist import KnowDist
    from safetransfer.training.regularizers.l2 import HeadL2
    from safetransfer.training.regularizers.l2sp import L2SP

    torch.manual_seed(1)
    model = tiny_resnet(4).double()
    images = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0])
    feature_term = regularizer == "knowdist"
    terms = {
        "main": KnowDist(alpha=50.0, layers=["layer3", "layer4"]) if feature_term else L2SP(alpha=3.0),
        "head": HeadL2(beta=0.2),
    }
    omega = Omega(terms)
    omega.bind(model, BindContext())
    reference = copy.deepcopy(model)
    # step away from the source weights against g_J, so that g_Omega (pulling back) conflicts with g_J
    backbone = list(model.backbone.parameters())
    g_start = torch.autograd.grad(F.cross_entropy(model(images)[0], labels), backbone)
    norm = float(flat_settings(g_start).norm())
    with torch.no_grad():
        for p, g in zip(backbone, g_start):
            p.sub_(g * (0.05 / norm))
        for p, q in zip(model.parameters(), reference.parameters()):
            q.copy_(p)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = list(reference.parameters())
    source_params = [p.detach() for p in terms["main"].source.parameters()] if feature_term else terms["main"].anchor

    # by hand, on the reference copy
    logits, features = reference(images)
    J = F.cross_entropy(logits, labels)
    g_J = torch.autograd.grad(J, ref_params, retain_graph=True)
    if feature_term:
        omega_value = terms["main"].value(reference, features)
        g_Omega = [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(omega_value, ref_params, allow_unused=True), ref_params)
        ]
    else:
        backbone_ids = {id(p) for p in reference.backbone.parameters()}
        anchors = iter(source_params)
        g_Omega = [
            3.0 * (p.detach() - next(anchors)) if id(p) in backbone_ids else torch.zeros_like(p) for p in ref_params
        ]
    g_Omega = [
        g + (0.2 * p.detach() if n.startswith("head.") else 0)
        for g, (n, p) in zip(g_Omega, reference.named_parameters())
    ]
    d = _manual_dtnh(g_J, g_Omega)
    assert float(flat_settings(g_J) @ flat_settings(g_Omega)) < 0, "the case must exercise the projection"
    expected = flat_settings([p.detach() for p in ref_params]) - 0.1 * d

    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    step = training_step(model, images, labels, omega, DTNH(), optimizer, params, record=True, angles=True)
    torch.testing.assert_close(flat_settings([p.detach() for p in params]), expected, rtol=1e-9, atol=1e-12)
    assert float(step.angles["conflict"]) == 1.0
    assert float(step.angles["angle_d_J"]) <= float(step.angles["angle_sum_J"])
    assert float(step.angles["angle_d_Omega"]) <= 180.0 and float(step.angles["angle_d_J"]) <= 90.0


def test_angles_are_the_angles_between_the_vectors():
    from safetransfer.training.engine import angle_diagnostics

    g_J = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    g_Omega = [torch.tensor([-1.0, 1.0], dtype=torch.float64)]
    d = [torch.tensor([1.0, 1.0], dtype=torch.float64)]  # DTNH's d for these
    angles = {k: float(v) for k, v in angle_diagnostics(g_J, g_Omega, d).items()}
    assert angles["angle_d_J"] == pytest.approx(45.0)
    assert angles["angle_d_Omega"] == pytest.approx(90.0)
    assert angles["angle_sum_J"] == pytest.approx(90.0)  # g_J + g_Omega = (0, 1)
    assert angles["angle_sum_Omega"] == pytest.approx(45.0)
    assert angles["angle_J_Omega"] == pytest.approx(135.0)
    assert angles["conflict"] == 1.0


@pytest.mark.parametrize("degrees", [0.01, 0.05, 0.1, 0.5])
def test_small_angles_match_a_float64_reference(degrees):
    """float32 gradients at 0.01-0.5 degrees apart: the angles agree with NumPy in float64
    (arctan2 of the components along and across) to 2e-5 degrees (float32 arccos was off by
    up to 0.02), and Angle 1 equals Angle 3 when nothing conflicts."""
    from safetransfer.training.directions import DTNH
    from safetransfer.training.engine import angle_diagnostics

    rng = np.random.default_rng(int(degrees * 1000))
    shapes = [(64, 3, 3, 3), (1000,), (10, 64)]
    n = sum(int(np.prod(s)) for s in shapes)
    e1 = rng.standard_normal(n)
    e1 /= np.linalg.norm(e1)
    e2 = rng.standard_normal(n)
    e2 -= e2 @ e1 * e1
    e2 /= np.linalg.norm(e2)
    theta = np.deg2rad(degrees)
    j = 3.0 * e1
    o = 0.02 * (np.cos(theta) * e1 + np.sin(theta) * e2)  # g_Omega nearly along g_J: no conflict

    def split(v):
        parts, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(torch.tensor(v[start : start + size], dtype=torch.float32).reshape(shape))
            start += size
        return parts

    g_J, g_Omega = split(j), split(o)
    d = DTNH()([g.clone() for g in g_J], g_Omega)
    angles = {k: float(v) for k, v in angle_diagnostics(g_J, g_Omega, d).items()}

    def reference(x, y):  # float64, from the float32 vectors actually used
        x = np.concatenate([t.double().numpy().ravel() for t in x])
        y = np.concatenate([t.double().numpy().ravel() for t in y])
        along = x @ y / np.linalg.norm(x)
        across = np.linalg.norm(y - along * x / np.linalg.norm(x))
        return np.rad2deg(np.arctan2(across, along))

    s = [a + b for a, b in zip(g_J, g_Omega)]
    assert angles["conflict"] == 0.0
    assert angles["angle_sum_Omega"] == pytest.approx(reference(s, g_Omega), abs=2e-5)
    assert angles["angle_d_Omega"] == pytest.approx(reference(d, g_Omega), abs=2e-5)
    assert angles["angle_d_J"] == pytest.approx(reference(d, g_J), abs=2e-5)
    assert angles["angle_sum_J"] == pytest.approx(reference(s, g_J), abs=2e-5)
    assert angles["angle_J_Omega"] == pytest.approx(reference(g_J, g_Omega), abs=2e-5)
    assert angles["angle_J_Omega"] == pytest.approx(degrees, abs=1e-4)
    assert angles["angle_d_J"] == angles["angle_sum_J"]
    assert angles["angle_sum_Omega"] == pytest.approx(degrees, rel=0.02)  # s is nearly g_J


def test_sum_direction_logs_equal_angles_1_and_3(compose_cfg, tmp_path):
    cfg = compose_cfg(
        *TINY, "train.iterations=3", "runtime.log_every=1", "runtime.diagnostics_every=1", "regularizer=l2sp_bss"
    )
    _run(cfg, 0, tmp_path)
    rows = _log(tmp_path, 0)
    assert len(rows) == 3
    for row in rows:
        assert float(row["angle_d_J"]) == pytest.approx(float(row["angle_sum_J"]), abs=1e-3)
        assert float(row["loss_Omega"]) == pytest.approx(
            float(row["Omega_head"]) + float(row["Omega_l2sp"]) + float(row["Omega_bss"]), rel=1e-5
        )
        assert 0 <= float(row["bss_sigma_min"]) <= float(row["bss_sigma_max"])


@pytest.mark.e2e  # a process per seed
def test_concurrent_seeds_give_each_seed_the_result_it_gets_alone(compose_cfg, tmp_path):
    """runtime.concurrent_seeds: the seeds in processes of their own, at once, sharing out the
    job's CPU threads (2 seeds: half each); per seed the same numbers as alone with that many
    threads (the thread count changes how the CPU sums, so it has to match)."""
    import json

    from safetransfer.job.run import run_job

    overrides = [*TINY, "seeds=[0,1]", "train.iterations=4", "optim.scheduler.milestones=[3]"]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        alone = run_job(compose_cfg(*overrides), tmp_path / "alone")
    finally:
        torch.set_num_threads(threads)
    together = run_job(compose_cfg(*overrides, "runtime.concurrent_seeds=true"), tmp_path / "together")
    for seed in (0, 1):
        a, b = (json.loads((tmp_path / d / f"seed_{seed}" / "metrics.json").read_text()) for d in ("alone", "together"))
        assert (a["top1"], a["test_loss"]) == (b["top1"], b["test_loss"])
        assert _log(tmp_path / "alone", seed) != [] and [r["loss_J"] for r in _log(tmp_path / "alone", seed)] == [
            r["loss_J"] for r in _log(tmp_path / "together", seed)
        ]
    assert alone["mean"] == together["mean"] and together["seeds"] == [0, 1]


@pytest.mark.slow
def test_compiled_network_trains_and_keeps_its_checkpoint_keys(compose_cfg, tmp_path):
    """runtime.compile=true: torch.compile in place; checkpoints keep the eager state_dict keys (resume works)."""
    cfg = compose_cfg(
        *TINY,
        "train.iterations=3",
        "optim.scheduler.milestones=[2]",
        "runtime.compile=true",
        "runtime.checkpoint_every=1",
        "runtime.keep_checkpoints=true",
    )
    metrics = _run(cfg, 0, tmp_path)
    assert 0 <= metrics["top1"] <= 100 and torch.isfinite(torch.tensor(metrics["test_loss"]))
    state = torch.load(tmp_path / "seed_0" / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 2 and not any("_orig_mod" in k for k in state["model"])


@pytest.mark.parametrize("val_fraction,split", [(0.0, "test"), (0.3, "val")])
def test_eval_every_writes_the_split_columns_on_the_right_rows(compose_cfg, tmp_path, val_fraction, split):
    import numpy as np

    cfg = compose_cfg(
        *TINY,
        "train.iterations=6",
        "runtime.log_every=1",
        "runtime.eval_every=2",
        "optim.scheduler.milestones=[5]",
        "train.batch_size=4",
    )
    metrics = _run(cfg, 0, tmp_path, val_fraction)
    rows = _log(tmp_path, 0)
    evaluated = [int(r["iteration"]) for r in rows if r[f"{split}_acc"] != ""]
    assert evaluated == [2, 4, 6] and f"{'val' if split == 'test' else 'test'}_acc" not in rows[0]
    last = rows[-1]
    if split == "test":  # the last row's evaluation is the final one, the same as metrics.json's
        assert float(last["test_acc"]) == pytest.approx(metrics["top1"])
        assert float(last["test_loss"]) == pytest.approx(metrics["test_loss"])
    else:
        assert float(last["val_acc"]) == pytest.approx(metrics["val_top1"])
    # the evaluation does not disturb training: the loss curve is the one of a run without it
    plain = _run(
        compose_cfg(
            *TINY, "train.iterations=6", "runtime.log_every=1", "optim.scheduler.milestones=[5]", "train.batch_size=4"
        ),
        0,
        tmp_path / "plain",
        val_fraction,
    )
    assert [r["loss_J"] for r in _log(tmp_path / "plain", 0)] == [r["loss_J"] for r in rows]
    assert plain["top1"] == metrics["top1"]
    spectrum = json.loads((tmp_path / "seed_0" / "spectrum.json").read_text())
    values = spectrum["singular_values"]
    assert len(values) == min(4, -(-metrics["test_images"] // 4)) and all(len(v) <= 4 for v in values)
    assert all(np.all(np.diff(v) <= 0) and min(v) >= 0 for v in values)  # descending, non-negative


def test_the_pace_is_measured_after_the_first_steps_and_projects_the_job(compose_cfg, tmp_path, caplog):
    """Before most of the training, the job's projected time from the measured step time; a long
    projection says how to shorten it."""
    from safetransfer.job import run

    heard = []
    cfg = compose_cfg(*TINY, "train.iterations=8", "runtime.log_every=0", "runtime.diagnostics_every=0")
    target = DemoTarget(train_images_per_class=10, test_images_per_class=4, sampling_rate=50)
    run_seed(cfg, 0, prepare_data(cfg, target), None, tmp_path, on_pace=lambda s, left: heard.append((s, left)))
    assert len(heard) == 1 and heard[0][0] > 0 and heard[0][1] == 8 - 5  # timed steps 2-5, three left
    # the report: 6 s an iteration, 8,000 iterations a seed, 4 seeds after this one
    report = run.pace_report(compose_cfg(), seeds_after=4)
    with caplog.at_level("INFO"):
        report(6.0, 7995)
    text = caplog.text
    assert "a seed takes about 13 h 20 min (8000 iterations)" in text  # 6 x 8000 s
    assert "this job about 2 d 18 h more (5 seeds to go)" in text  # 6 x 7995 + 4 x 48000 s = 66.6 h
    assert "To shorten it: train.iterations=" in text
    assert run.duration_text(59) == "59 s" and run.duration_text(600) == "10 min"


def test_save_weights_keeps_the_fine_tuned_network_that_was_scored(compose_cfg, tmp_path):
    """runtime.save_weights=true: seed_<s>/model.pt loads into a fresh network that scores the
    test split exactly as metrics.json says (evaluated again here)."""
    from safetransfer.training.backbones import TransferNet
    from safetransfer.training.engine import evaluate

    cfg = compose_cfg(
        *TINY,
        "runtime.save_weights=true",
        "runtime.log_every=0",
        "runtime.diagnostics_every=0",
        "runtime.spectrum_batches=0",
    )
    target = DemoTarget(train_images_per_class=10, test_images_per_class=4, sampling_rate=50)
    data = prepare_data(cfg, target)
    metrics = run_seed(cfg, 0, data, None, tmp_path)
    saved = torch.load(tmp_path / "seed_0" / "model.pt", weights_only=True)
    assert saved["backbone"] == "resnet18" and saved["num_classes"] == 6
    model = TransferNet("resnet18", saved["num_classes"])
    model.load_state_dict(saved["state_dict"])
    loader = torch.utils.data.DataLoader(data.test, batch_size=8)
    top1, loss = evaluate(model, loader, torch.device("cpu"))
    assert top1 == metrics["top1"] and loss == pytest.approx(metrics["test_loss"])


def test_a_source_head_given_changes_nothing_for_a_method_that_does_not_read_it(compose_cfg, tmp_path):
    """Fine-tuning from a source that brings its classifier trains exactly as from its backbone alone:
    the same top-1, test loss and log (the head reaches only the terms that ask for it)."""
    from safetransfer.common.registry import build
    from safetransfer.data.preparation import prepare_data
    from safetransfer.job.run import run_seed
    from safetransfer.sources.base import SourceWeights
    from safetransfer.training.backbones import create_backbone

    cfg = compose_cfg(*TINY, "runtime.spectrum_batches=0")
    data = prepare_data(cfg, build("target", cfg.target, "target"))
    torch.manual_seed(3)
    backbone = create_backbone("resnet18").state_dict()
    head = {"weight": torch.randn(7, 512), "bias": torch.randn(7)}
    alone = run_seed(cfg, 0, data, SourceWeights(backbone), tmp_path / "alone")
    beside = run_seed(cfg, 0, data, SourceWeights(backbone, head, [f"c{i}" for i in range(7)]), tmp_path / "beside")
    assert (alone["top1"], alone["test_loss"]) == (beside["top1"], beside["test_loss"])
    logs = [pd.read_csv(tmp_path / run / "seed_0" / "log.csv") for run in ("alone", "beside")]
    numbers = [c for c in logs[0].columns if c != "elapsed_s"]  # all but the clock
    pd.testing.assert_frame_equal(logs[0][numbers], logs[1][numbers])


def test_the_pace_is_measured_again_over_each_log_rows_window_and_a_shared_cpu_is_said():
    """Issue 40: one early measurement predicted 6 s where seeds took 37-152 s on a machine other jobs
    shared. Each log row now gives the pace over the steps since the previous row (by hand: (15 - 5) s over
    20 - 10 iterations = 1 s/it, 80 iterations left), and a load average above the job's threads says so."""
    from safetransfer.training.train_log import TrainLog, shared_cpu_note

    assert shared_cpu_note(torch.device("cpu"), load=3.9, threads=2) == (
        "; the CPU is shared (load average 3.9 over the 2 threads this job uses): times stretch"
    )
    assert shared_cpu_note(torch.device("cpu"), load=1.5, threads=2) == ""
    assert shared_cpu_note(torch.device("meta"), load=9.0, threads=2) == ""  # not the CPU's cores
    log = TrainLog(None, ["iteration"], torch.device("meta"), total=100, progress="log")
    assert log.pace(10, 5.0) == ""  # no window before the first row
    assert log.pace(20, 15.0) == " | 1 s/it, about 1 min left"
    assert log.pace(60, 95.0) == " | 2 s/it, about 1 min left"  # the machine slowed: the next window says so
    assert log.pace(100, 135.0) == " | 1 s/it"  # the last row: nothing left
