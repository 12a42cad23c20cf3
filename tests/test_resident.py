"""Images held on the device (data.on_device, safetransfer.data.resident), tried on the CPU
device: the same batches, order and augmentation draws as the loader path, the same
training, and an exact resume after a stop."""

import json

import numpy as np
import pytest
import torch

import fixtures
from conftest import TINY, StopAt, log_rows
from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import build
from safetransfer.common.signals import Preempted
from safetransfer.data.preparation import prepare_data
from safetransfer.data.resident import ResidentLoader, fits, held_bytes
from safetransfer.job.build import build_seed
from safetransfer.job.checks import check_config
from safetransfer.job.run import run_seed
from safetransfer.training.engine import Batches


@pytest.fixture
def cub_cfg(compose_cfg, tmp_path):
    """A cached target (3 classes x 6 training images: 4 batches of 4 an epoch, two left over)."""
    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=6, test_per_class=3)
    shrink = [o for o in TINY if not o.startswith("target.")]

    def make(*overrides: str):
        return compose_cfg(
            *shrink,
            "target=cub200",
            f"target.root={tmp_path / 'data'}",
            "target.expected_classes=3",
            "target.expected_split=[18,9]",
            "train.batch_size=4",
            "train.iterations=7",
            "optim.scheduler.milestones=[5]",
            "runtime.spectrum_batches=0",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides,
        )

    return make


HELD = ("data.on_device=true", "data.augment_on=device")  # on the CPU, auto augments in the workers
LOADED = ("data.on_device=false", "data.augment_on=device")  # the loader path with the same augmentation


def _prepared(cfg):
    check_config(cfg)
    return prepare_data(cfg, build("target", cfg.target, "target"))


def _augmented_batches(cfg, count):
    built = build_seed(cfg, 0, _prepared(cfg), None)
    batches = Batches(built.parts.loader)
    out = []
    for _ in range(count):
        epoch, (images, labels) = next(batches)
        out.append((epoch, built.parts.batch_transform(images.to(built.parts.device)), labels))
    return built, out


def test_held_batches_are_the_loaders_batches_order_and_augmentation(cub_cfg):
    held, from_device = _augmented_batches(cub_cfg(*HELD), 9)  # into the third epoch
    loaded, from_loader = _augmented_batches(cub_cfg(*LOADED), 9)
    assert isinstance(held.parts.loader, ResidentLoader) and not isinstance(loaded.parts.loader, ResidentLoader)
    assert [epoch for epoch, _, _ in from_device] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    for (epoch_a, images_a, labels_a), (epoch_b, images_b, labels_b) in zip(from_device, from_loader):
        assert epoch_a == epoch_b and torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)
    # the epochs are orders of their own, and the test images are every test image in order
    assert not torch.equal(from_device[0][2], from_device[4][2]) or not torch.equal(
        from_device[0][1], from_device[4][1]
    )
    test_held = torch.cat([labels for _, labels in held.test_loader])
    test_loaded = torch.cat([labels for _, labels in loaded.test_loader])
    assert torch.equal(test_held, test_loaded) and len(test_held) == 9


def test_held_training_equals_the_loader_path_and_resumes_exactly_after_a_stop(cub_cfg, tmp_path, caplog):
    held_cfg = cub_cfg(*HELD)
    data = _prepared(held_cfg)
    assert data.resident and data.device_augment
    whole = run_seed(held_cfg, 0, data, None, tmp_path / "held")
    loaded = run_seed(cub_cfg(*LOADED), 0, _prepared(cub_cfg(*LOADED)), None, tmp_path / "loaded")
    assert (whole["top1"], whole["test_loss"]) == (loaded["top1"], loaded["test_loss"])
    assert log_rows(tmp_path / "held" / "seed_0") == log_rows(tmp_path / "loaded" / "seed_0")

    with pytest.raises(Preempted):  # stopped after iteration 5 (in the second epoch), checkpoint written
        run_seed(held_cfg, 0, data, None, tmp_path / "stopped", stop=StopAt(5))
    assert not (tmp_path / "stopped" / "seed_0" / "metrics.json").exists()
    caplog.set_level("INFO")
    resumed = run_seed(held_cfg, 0, _prepared(held_cfg), None, tmp_path / "stopped")
    assert "seed 0: resumed after iteration 5 of 7" in caplog.text  # continued, not started over
    assert (resumed["top1"], resumed["test_loss"]) == (whole["top1"], whole["test_loss"])
    assert log_rows(tmp_path / "stopped" / "seed_0") == log_rows(tmp_path / "held" / "seed_0")
    assert json.loads((tmp_path / "stopped" / "seed_0" / "metrics.json").read_text())["train_images"] == 18


def test_the_test_loader_gives_every_image_once_in_order_and_the_training_loader_drops_the_short_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    labels = torch.arange(10)
    test = ResidentLoader(images, labels, 4)
    assert len(test) == 3 and [b[1].tolist() for b in test] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.cat([b[0] for b in test]), images)

    class Order:  # a sampler's (index, draw) pairs
        def __iter__(self):
            return iter([(i, 0) for i in (9, 3, 0, 7, 1, 2, 8, 5, 6, 4)])

    train = ResidentLoader(images, labels, 4, Order())
    assert len(train) == 2 and [b[1].tolist() for b in train] == [[9, 3, 0, 7], [1, 2, 8, 5]]


def test_auto_holds_nothing_on_the_cpu_and_the_size_is_counted_by_hand(cub_cfg):
    # 18 training images of 3 x 36 x 36 and 9 test images of 3 x 32 x 32 (the centre crop)
    assert held_bytes((18, 9), (3, 36, 36), (3, 32, 32)) == 18 * 3 * 36 * 36 + 9 * 3 * 32 * 32
    assert not fits(1, torch.device("cpu"))
    data = _prepared(cub_cfg())  # data.on_device=auto on the CPU: the loader path
    assert not data.resident and not data.device_augment


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("data.on_device=maybe",), "data.on_device=maybe is not a known choice; allowed: auto, true, false"),
        (
            ("data.on_device=true", "data.augment_on=workers"),
            "cannot take data.augment_on=workers; set data.augment_on=device",
        ),
        (("data.on_device=true", "data.cache=false"), "set data.cache=true"),
        (("data.on_device=true",), r"augments in the loader workers here \(auto .*\): set data.augment_on=device"),
    ],
)
def test_bad_on_device_settings_are_one_line_before_training(cub_cfg, overrides, expected):
    """The last: on the CPU augment_on=auto augments in the workers, whose pixels differ from the
    device's under the same key; holding the images would silently change them. Both refusals advise
    the same setting (they advised `auto` and refused it)."""
    with pytest.raises(ConfigError, match=expected):
        check_config(cub_cfg(*overrides))
        prepare_data(cub_cfg(*overrides), build("target", cub_cfg(*overrides).target, "target"))
    fixed = cub_cfg("data.on_device=true", "data.augment_on=device")
    check_config(fixed)
    assert prepare_data(fixed, build("target", fixed.target, "target")).resident  # the advice is taken


def test_on_device_true_for_images_held_in_memory_says_they_are_not_cached(compose_cfg):
    from safetransfer.data.targets.demo import DemoTarget

    cfg = compose_cfg(*TINY, "data.on_device=true")
    with pytest.raises(ConfigError, match="not cached .* as the demo's"):
        prepare_data(cfg, DemoTarget(train_images_per_class=10, test_images_per_class=4))


def test_the_held_copy_is_made_once_per_job(cub_cfg):
    data = _prepared(cub_cfg(*HELD))
    first = data.held_on(torch.device("cpu"))
    assert data.held_on(torch.device("cpu")) is first
    train_images, train_labels = first["train"]
    cached = np.asarray(data.train.dataset.images)[data.train.indices]
    assert np.array_equal(train_images.numpy(), cached) and train_images.dtype == torch.uint8
    assert train_labels.tolist() == [int(data.train.dataset.labels[i]) for i in data.train.indices]
