"""Target datasets parsed from fixtures in their official layouts: class counts, split
sizes, sampling, and the missing-data messages."""

import numpy as np
import pytest
import torch
from PIL import Image

import fixtures
from conftest import TINY, table_rows
from safetransfer.common.errors import ConfigError, DownloadError
from safetransfer.common.registry import build
from safetransfer.data.targets.cub200 import CUB200, MD5, URL


def test_cub200_official_split(tmp_path):
    sizes = fixtures.make_cub200(tmp_path, classes=3, train_per_class=4, test_per_class=3)
    target = CUB200(str(tmp_path), expected_classes=3, expected_split=(sizes["train"], sizes["test"]))
    target.check()
    assert target.classes == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    train, test = target.train_set(), target.test_set()
    assert (len(train), len(test)) == (12, 9)
    assert np.bincount(target.train_labels()).tolist() == [4, 4, 4]
    assert {p.name for p in train.paths}.isdisjoint({p.name for p in test.paths})
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 0


def test_cub200_counts_are_checked(tmp_path):
    fixtures.make_cub200(tmp_path, classes=3)
    with pytest.raises(ConfigError, match="lists 3 classes, but cub200 has 200"):
        CUB200(str(tmp_path)).check()
    with pytest.raises(ConfigError, match="the official split has 5994 and 5794"):
        CUB200(str(tmp_path), expected_classes=3).check()


def test_cub200_missing_data_message(tmp_path):
    with pytest.raises(ConfigError) as error:
        CUB200(str(tmp_path / "data")).check()
    message = str(error.value)
    assert URL in message and f"md5:{MD5}" in message and "CUB_200_2011/{images.txt," in message
    assert "target.download=true" in message
    # the archive holds CUB_200_2011/ itself: the advice is to extract it into the root, not into the folder
    assert f"extract into {tmp_path / 'data'} (the archive holds CUB_200_2011/ itself)" in message


def test_cub200_end_to_end(cli, tmp_path):
    from conftest import TINY

    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=6, test_per_class=2)
    shrink = [o for o in TINY if not o.startswith("target.")]
    result = cli(
        *shrink,
        "target=cub200",
        f"target.root={tmp_path / 'data'}",
        "target.expected_classes=3",
        "target.expected_split=[18,6]",
        "target.sampling_rate=50",
        "train.batch_size=4",
        "results.dir=res",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    row = table_rows(tmp_path / "res", "cub200").iloc[0]
    assert row["target"] == "cub200" and row["sampling_rate"] == 50


LISTED = {
    "mit_indoor67": (
        "safetransfer.data.targets.mit_indoor67",
        "MITIndoor67",
        fixtures.make_mit_indoor67,
        67,
        (5360, 1340),
        "indoorCVPR_09.tar",
    ),
    "stanford_dogs": (
        "safetransfer.data.targets.stanford_dogs",
        "StanfordDogs",
        fixtures.make_stanford_dogs,
        120,
        (12000, 8580),
        "ImageNetDogs/lists.tar",
    ),
}


def listed_target(name, root, **options):
    import importlib

    module, cls, *_ = LISTED[name]
    return getattr(importlib.import_module(module), cls)(str(root), **options)


@pytest.mark.parametrize("name", sorted(LISTED))
def test_listed_targets_official_split(tmp_path, name):
    make = LISTED[name][2]
    sizes = make(tmp_path, classes=3, train_per_class=4, test_per_class=2)
    target = listed_target(name, tmp_path, expected_classes=3, expected_split=(sizes["train"], sizes["test"]))
    target.check()
    assert list(target.classes) == sizes["classes"]
    assert (len(target.train_set()), len(target.test_set())) == (12, 6)
    assert np.bincount(target.train_labels()).tolist() == [4, 4, 4]
    assert np.bincount(target.test_set().labels).tolist() == [2, 2, 2]
    for split in (target.train_set(), target.test_set()):  # every listed image exists and sits in its class folder
        for path, label in zip(split.paths, split.labels):
            assert path.is_file() and path.parent.name == sizes["classes"][label]
    assert set(target.train_set().paths).isdisjoint(target.test_set().paths)
    image, _ = target.train_set()[0]
    assert image.size == (44, 40)


@pytest.mark.parametrize("name", sorted(LISTED))
def test_listed_targets_check_counts_and_say_what_is_missing(tmp_path, name):
    _, _, make, classes, split, url_part = LISTED[name]
    with pytest.raises(ConfigError) as error:
        listed_target(name, tmp_path / "empty").check()
    assert url_part in str(error.value) and "target.download=true" in str(error.value)
    make(tmp_path, classes=3)
    with pytest.raises(ConfigError, match=f"lists 3 classes, but {name} has {classes}"):
        listed_target(name, tmp_path).check()
    with pytest.raises(ConfigError, match=f"the official split has {split[0]} and {split[1]}"):
        listed_target(name, tmp_path, expected_classes=3).check()


@pytest.mark.parametrize("rate", [15, 30, 50, 100])
def test_sampling_rates_on_a_listed_target(tmp_path, rate):
    from safetransfer.data.sampling import per_class_count

    fixtures.make_mit_indoor67(tmp_path, classes=3, train_per_class=7, test_per_class=1)
    target = listed_target(
        "mit_indoor67", tmp_path, expected_classes=3, expected_split=(21, 3), sampling_rate=rate, sampling_seed=4
    )
    chosen = target.sampled_train_indices()
    counts = np.bincount(target.train_labels()[chosen], minlength=3)
    assert counts.tolist() == [per_class_count(7, rate)] * 3


# ---------------------------------------------------------------- torchvision's dataset classes

TORCHVISION = {
    "cifar10": ("CIFAR10", {"train": True}, {"train": False}, fixtures.make_cifar10),
    "flowers102": ("Flowers102", {"split": "train"}, {"split": "test"}, fixtures.make_flowers102),
    "oxford_pets": ("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}, fixtures.make_oxford_pets),
    "fgvc_aircraft": (
        "FGVCAircraft",
        {"split": "trainval", "annotation_level": "variant"},
        {"split": "test", "annotation_level": "variant"},
        fixtures.make_fgvc_aircraft,
    ),
}


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks CIFAR-10's and Flowers-102's files against the published md5s, which a
    fixture cannot match: keep the existence check, drop the digest."""
    import os

    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers

    for module in (cifar, flowers):
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_targets(tmp_path, no_md5, name):
    from safetransfer.data.targets.torchvision_datasets import TorchvisionTarget

    dataset, train, test, make = TORCHVISION[name]
    sizes = make(tmp_path)
    target = TorchvisionTarget(
        name,
        dataset,
        str(tmp_path),
        train,
        test,
        expected_classes=sizes["classes"],
        expected_split=(sizes["train"], sizes["test"]),
    )
    target.check()
    assert len(target.classes) == sizes["classes"]
    assert (len(target.train_set()), len(target.test_set())) == (sizes["train"], sizes["test"])
    counts = np.bincount(target.train_labels(), minlength=sizes["classes"])
    assert counts.min() >= 1 and counts.sum() == sizes["train"]
    image, label = target.train_set()[0]
    assert isinstance(image, Image.Image) and 0 <= label < sizes["classes"]
    with pytest.raises(ConfigError, match="the official split has"):
        TorchvisionTarget(name, dataset, str(tmp_path), train, test, expected_split=(1, 1)).check()


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_targets_missing_data_message(tmp_path, name):
    from safetransfer.data.targets.torchvision_datasets import ORIGINS, TorchvisionTarget

    dataset, train, test, _ = TORCHVISION[name]
    with pytest.raises(ConfigError) as error:
        TorchvisionTarget(name, dataset, str(tmp_path), train, test).check()
    url, layout = ORIGINS[dataset]
    assert str(tmp_path / layout.split("/")[0]) in str(error.value) and url in str(error.value)


def test_a_torchvision_target_end_to_end(cli, tmp_path):
    from conftest import TINY

    fixtures.make_fgvc_aircraft(tmp_path / "data", trainval=6, test=2)
    shrink = [o for o in TINY if not o.startswith("target.")]
    result = cli(
        *shrink,
        "target=fgvc_aircraft",
        f"target.root={tmp_path / 'data'}",
        "target.expected_classes=3",
        "target.expected_split=[18,6]",
        "train.batch_size=4",
        "results.dir=res",
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_caltech256_protocol(tmp_path):
    from safetransfer.data.targets.caltech256 import Caltech256

    sizes = fixtures.make_caltech256(tmp_path, classes=3, per_class=(9, 8, 10))
    target = Caltech256(str(tmp_path), train_per_class=5, test_per_class=3, split_seed=1, expected_classes=3)
    target.check()
    assert target.classes == sizes["classes"]  # clutter excluded
    train, test = target.train_set(), target.test_set()
    assert np.bincount(train.labels).tolist() == [5, 5, 5] and np.bincount(test.labels).tolist() == [3, 3, 3]
    assert set(train.paths).isdisjoint(test.paths)
    assert all(p.is_file() and p.parent.name == sizes["classes"][label] for p, label in zip(train.paths, train.labels))
    same = Caltech256(str(tmp_path), train_per_class=5, test_per_class=3, split_seed=1, expected_classes=3)
    assert same.train_set().paths == train.paths
    other = Caltech256(str(tmp_path), train_per_class=5, test_per_class=3, split_seed=2, expected_classes=3)
    assert other.train_set().paths != train.paths
    assert train[0][0].mode == "RGB"
    with pytest.raises(ConfigError, match="class 002.object_1 has 8 images, fewer than 6 \\+ 3"):
        Caltech256(str(tmp_path), train_per_class=6, test_per_class=3, expected_classes=3).check()
    with pytest.raises(ConfigError, match="lists 3 classes, but caltech256_30 has 256"):
        Caltech256(str(tmp_path)).check()
    with pytest.raises(ConfigError, match="256_ObjectCategories.tar"):
        Caltech256(str(tmp_path / "none")).check()


# ---------------------------------------------------------------- the decoded-image cache


def cub_with_cache(tmp_path, resize=48, crop=40):
    from omegaconf import OmegaConf

    from safetransfer.data.preparation import cached_data

    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=5, test_per_class=2)
    target = CUB200(str(tmp_path / "data"), expected_classes=3, expected_split=(15, 6))
    cfg = OmegaConf.create(
        {
            "target": {"name": "cub200", "root": str(tmp_path / "data"), "sampling_rate": 100},
            "data": {"resize": resize, "crop": crop, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "cache": True},
            "paths": {"cache_dir": str(tmp_path / "cache")},
            "runtime": {"num_workers": 0},
        }
    )
    return target, cfg, cached_data


def test_cache_gives_the_same_pixels_as_the_direct_path(tmp_path):
    from safetransfer.data.datasets import Transformed
    from safetransfer.data.transforms import test_transform, train_transform

    target, cfg, cached_data = cub_with_cache(tmp_path)
    indices = np.array([0, 3, 7, 14])
    geometry = (48, 40, [0.5, 0.4, 0.3], [0.2, 0.3, 0.25])
    direct_train = Transformed(target.train_set(), indices, train_transform(*geometry))
    direct_test = Transformed(target.test_set(), range(6), test_transform(*geometry))
    cached_train, cached_test = cached_data(cfg, target.train_set(), target.test_set(), indices)
    for i in range(len(indices)):
        torch.manual_seed(i)  # the same crop and mirror on both paths
        expected, label = direct_train[i]
        torch.manual_seed(i)
        got, cached_label = cached_train[i]
        assert torch.equal(expected, got) and label == cached_label
    for i in range(6):
        assert torch.equal(direct_test[i][0], cached_test[i][0])
    files = sorted(p.name for p in (tmp_path / "cache" / "decoded").glob("*.npy"))
    assert len(files) == 4  # train and test, images and labels
    assert np.load(next((tmp_path / "cache" / "decoded").glob("*.images.npy")), mmap_mode="r").dtype == np.uint8


def test_a_disk_without_room_for_the_cache_is_one_line_before_any_write(tmp_path, monkeypatch):
    """A full disk under the memory-mapped cache killed the job with a SIGBUS ("Bus error", exit 135)
    and left a split-sized .tmp: the free space is checked first, and the space needed named."""
    import shutil
    from collections import namedtuple

    from safetransfer.common.errors import StorageError

    target, cfg, cached_data = cub_with_cache(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(StorageError) as caught:
        cached_data(cfg, target.train_set(), target.test_set(), np.arange(15))
    message = str(caught.value)
    folder = tmp_path / "cache" / "decoded"
    assert f"needs 0.1 MiB in {folder} and 1.0 MiB are free" in message and "paths.cache_dir" in message
    assert "\n" not in message
    assert not [p.name for p in folder.iterdir() if not p.name.endswith(".lock")]  # no .tmp, no .npy


def test_a_disk_that_fills_while_the_cache_is_allocated_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The file's blocks are allocated before the mapped writes: a disk that fills up in between
    (another job writing) is refused there, as an error, not as a SIGBUS in the middle of the writes."""
    import errno
    import os

    from safetransfer.common.errors import StorageError

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    target, cfg, cached_data = cub_with_cache(tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StorageError, match="could not allocate .*No space left on device.*free space in"):
        cached_data(cfg, target.train_set(), target.test_set(), np.arange(15))
    folder = tmp_path / "cache" / "decoded"
    assert not [p.name for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    from safetransfer.data import cache

    target, cfg, cached_data = cub_with_cache(tmp_path)
    cached_data(cfg, target.train_set(), target.test_set(), np.arange(15))
    before = set((tmp_path / "cache" / "decoded").glob("*.npy"))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(cache, "build", no_rebuild)
    cfg.target.sampling_rate = 30  # another sampling rate shares the whole-split cache
    cached_data(cfg, target.train_set(), target.test_set(), np.arange(0, 15, 3))
    monkeypatch.undo()
    cfg.data.resize = 44  # another size: new files
    cached_data(cfg, target.train_set(), target.test_set(), np.arange(15))
    assert len(set((tmp_path / "cache" / "decoded").glob("*.npy")) - before) == 4


def test_a_crash_while_building_leaves_no_file(tmp_path):
    from safetransfer.data.cache import cached_split

    target, cfg, _ = cub_with_cache(tmp_path)

    class Breaks:
        def __len__(self):
            return 15

        def __getitem__(self, i):
            if i == 9:
                raise OSError("disk read error")
            return target.train_set()[i]

    with pytest.raises(ConfigError, match=r"item 9 of Breaks cannot be read as an image \(OSError: disk read error\)"):
        cached_split(Breaks(), np.arange(15), "train", 48, 40, tmp_path / "cache", {"x": 1})
    assert not [p for p in (tmp_path / "cache" / "decoded").iterdir() if p.suffix in (".npy", ".tmp")]
    again = cached_split(target.train_set(), np.arange(15), "train", 48, 40, tmp_path / "cache", {"x": 1})
    assert len(again) == 15 and again[0][0].shape == (3, 48, 48)


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path, caplog, damage):
    """A truncated cached .npy ("mmap length is greater than file size") stopped every run
    that used it: it is decoded again, with a warning naming it."""
    from safetransfer.data.cache import cached_split

    target, cfg, _ = cub_with_cache(tmp_path)
    first = cached_split(target.train_set(), np.arange(15), "train", 48, 40, tmp_path / "cache", {"x": 1})
    expected = [first[i][0].clone() for i in range(15)]
    (images,) = list((tmp_path / "cache" / "decoded").glob("*.images.npy"))
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not an array\n")
    again = cached_split(target.train_set(), np.arange(15), "train", 48, 40, tmp_path / "cache", {"x": 1})
    assert len(again) == 15 and all(torch.equal(again[i][0], expected[i]) for i in range(15))
    assert str(images) in caplog.text and "the decoded split is built again" in caplog.text


def test_device_augment_crops_mirrors_and_normalises_each_sample():
    from safetransfer.data.augment import DeviceAugment

    images = torch.randint(0, 256, (5, 3, 10, 12), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    out = DeviceAugment(6, mean, std, seed=3, device=torch.device("cpu"))(images)
    top, left, flip = DeviceAugment(6, mean, std, seed=3, device=torch.device("cpu")).offsets(5, 10, 12)
    assert out.shape == (5, 3, 6, 6) and flip.any() and not flip.all()
    for b in range(5):
        expected = images[b, :, top[b] : top[b] + 6, left[b] : left[b] + 6].float() / 255
        if flip[b]:
            expected = expected.flip(-1)
        expected = (expected - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(out[b], expected)
    test_time = DeviceAugment(6, mean, std, seed=3, device=torch.device("cpu"), train=False)(images)
    torch.testing.assert_close(
        test_time, (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    )


def normalised(images, mean, std):
    return (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_device_random_resized_crop_is_each_window_resized_and_mirrored():
    """Against F.interpolate (bilinear, align_corners=False) of each sample's window: the
    device's one grid_sample over the batch reads the same coordinates."""
    from safetransfer.data.augment import DeviceAugment

    images = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    make = lambda: DeviceAugment(
        12,
        mean,
        std,
        seed=5,
        device=torch.device("cpu"),
        train_crop="random_resized_crop",
    )
    out = make()(images)
    top, left, h, w, flip = make().boxes(6, 20, 24)
    assert out.shape == (6, 3, 12, 12) and flip.any() and not flip.all()
    assert (h > 12).any() and (h < 12).any()  # windows that shrink and windows that grow
    for b in range(6):
        window = images[b : b + 1, :, top[b] : top[b] + h[b], left[b] : left[b] + w[b]].float()
        expected = torch.nn.functional.interpolate(window, size=(12, 12), mode="bilinear", align_corners=False)[0]
        if flip[b]:
            expected = expected.flip(-1)
        torch.testing.assert_close(out[b], normalised(expected, mean, std), atol=1e-4, rtol=0)


def test_device_random_resized_crop_draws_torchvision_windows():
    """The windows' distribution against torchvision's RandomResizedCrop.get_params (two-sample
    Kolmogorov-Smirnov tests over 3,000 draws each): on a square image, and on a narrow one
    where most tries do not fit and the centre crop is the fallback."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import v2

    from safetransfer.data.augment import DeviceAugment

    torch.manual_seed(0)
    for height, width in ((64, 64), (60, 12)):
        augment = DeviceAugment(
            8, [0.5] * 3, [0.2] * 3, seed=1, device=torch.device("cpu"), train_crop="random_resized_crop"
        )
        top, left, h, w, _ = (t.numpy() for t in augment.boxes(3000, height, width))
        image = torch.zeros(3, height, width)
        reference = np.array([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)])
        assert (h >= 1).all() and (h + top <= height).all() and (w >= 1).all() and (w + left <= width).all()
        for ours, theirs in (
            (h, reference[:, 2]),
            (w, reference[:, 3]),
            (top, reference[:, 0]),
            (left, reference[:, 1]),
            (h * w, reference[:, 2] * reference[:, 3]),
        ):
            assert ks_2samp(ours, theirs).pvalue > 1e-3
        if width == 12:  # the narrow image's fallback: the whole width, height 12 / (3/4) = 16, centred
            fallback = (w == 12) & (h == 16) & (top == 22)
            assert (
                0.1 < fallback.mean()
                and abs(fallback.mean() - ((reference[:, 2:] == [16, 12]).all(1) & (reference[:, 0] == 22)).mean())
                < 0.05
            )


def test_device_ten_crops_are_torchvisions_ten_crops():
    from torchvision.transforms import v2

    from safetransfer.data.augment import DeviceAugment

    images = torch.randint(0, 256, (3, 3, 11, 13), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    out = DeviceAugment(6, mean, std, seed=0, device=torch.device("cpu"), train=False, test_crops=10)(images)
    assert out.shape == (3, 10, 3, 6, 6)
    for b in range(3):
        expected = torch.stack([normalised(view, mean, std) for view in v2.TenCrop(6)(images[b])])
        torch.testing.assert_close(out[b], expected)


@pytest.mark.parametrize("crops", [(), ("data.train_crop=random_resized_crop", "data.test_crops=10")])
def test_augmenting_on_the_device_trains_and_is_deterministic(compose_cfg, tmp_path, crops):
    from conftest import TINY
    from safetransfer.common.registry import build
    from safetransfer.data.preparation import prepare_data
    from safetransfer.job.checks import check_config
    from safetransfer.job.run import run_seed

    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=6, test_per_class=2)
    shrink = [o for o in TINY if not o.startswith("target.")]
    cfg = compose_cfg(
        *shrink,
        "target=cub200",
        f"target.root={tmp_path / 'data'}",
        "target.expected_classes=3",
        "target.expected_split=[18,6]",
        "train.batch_size=4",
        "data.augment_on=device",
        f"paths.cache_dir={tmp_path / 'cache'}",
        *crops,
    )
    check_config(cfg)  # the check refused the BSS crops on the device, which the device augmentation does
    data = prepare_data(cfg, build("target", cfg.target, "target"))
    assert data.device_augment and data.train[0][0].dtype == torch.uint8
    # the test split is cached as its views' source: the centre crop, or the resize x resize square for ten crops
    assert data.test[0][0].shape[-1] == (cfg.data.resize if crops else cfg.data.crop)
    first = run_seed(cfg, 0, data, None, tmp_path / "a")
    again = run_seed(cfg, 0, data, None, tmp_path / "b")
    assert first["top1"] == again["top1"] and first["test_loss"] == again["test_loss"]
    assert first["test_images"] == 6


def test_downloads_are_checked_against_their_pinned_digest(tmp_path, monkeypatch):
    """The download itself is replaced (no network): a file that does not match is refused and removed."""
    import hashlib

    from safetransfer.common import downloads
    from safetransfer.common.downloads import fetch_archive

    def fake_stream(url, handle, settings):
        return handle.write(b"not the real list")

    monkeypatch.setattr(downloads, "stream", fake_stream)
    good = hashlib.sha1(b"not the real list").hexdigest()
    assert fetch_archive("http://example.org/TrainImages.txt", tmp_path, f"sha1:{good}")
    assert (tmp_path / "TrainImages.txt").read_bytes() == b"not the real list"
    assert not fetch_archive("http://example.org/TrainImages.txt", tmp_path, f"sha1:{good}")  # present: kept
    with pytest.raises(DownloadError, match="does not match the published 00000"):
        fetch_archive("http://example.org/TestImages.txt", tmp_path, "md5:" + "0" * 32)
    assert not (tmp_path / "TestImages.txt").exists()


# ---------------------------------------------------------------- Stanford Cars, both releases


def test_stanford_cars_all_images_release(tmp_path):
    from safetransfer.data.targets.stanford_cars import StanfordCars

    sizes = fixtures.make_stanford_cars_all_images(tmp_path, classes=3, train=3, test=2)
    target = StanfordCars(str(tmp_path), expected_classes=3, expected_split=(9, 6))
    target.check()
    assert target.layout == "all_images" and target.classes == ["Make Model 2000", "Make Model 2001", "Make Model 2002"]
    assert (len(target.train_set()), len(target.test_set())) == (sizes["train"], sizes["test"])
    # the release's class field counts from 1; image i + 1 is of class i // 5, test when odd and < 4
    for split, test_flag in ((target.train_set(), 0), (target.test_set(), 1)):
        for path, label in zip(split.paths, split.labels):
            i = int(path.stem) - 1
            c, j = divmod(i, 5)
            assert label == c and int(j % 2 == 1 and j < 4) == test_flag
    # a list in the BSS authors' format names these files
    (tmp_path / "cars.txt").write_text("train/1/000001.jpg\ntrain/3/000013.jpg\n")
    listed = StanfordCars(
        str(tmp_path), expected_classes=3, expected_split=(9, 6), sample_list=str(tmp_path / "cars.txt")
    )
    indices = listed.sampled_train_indices()
    assert [listed.train_files()[i].rsplit("/", 1)[-1] for i in indices] == ["000001.jpg", "000013.jpg"]
    assert listed.train_labels()[indices].tolist() == [0, 2]


def test_stanford_cars_torchvision_layout_and_what_it_refuses(tmp_path):
    from safetransfer.common.errors import MissingData
    from safetransfer.data.targets.stanford_cars import StanfordCars

    with pytest.raises(MissingData, match="car_ims/NNNNNN.jpg,cars_annos.mat.*cars_train/"):
        StanfordCars(str(tmp_path)).check()
    fixtures.make_stanford_cars(tmp_path, classes=3, train=3, test=2)
    target = StanfordCars(str(tmp_path), expected_classes=3, expected_split=(9, 6))
    target.check()
    assert target.layout == "torchvision" and len(target.classes) == 3
    assert np.bincount(target.train_labels()).tolist() == [3, 3, 3]
    with pytest.raises(ConfigError, match="the BSS authors' Stanford Cars lists name the car_ims/NNNNNN.jpg"):
        StanfordCars(
            str(tmp_path), expected_classes=3, expected_split=(9, 6), sample_list="bss", sampling_rate=15
        ).check()


def _image_folder(root, classes=("ants", "bees"), train=6, test=3):
    from fixtures import write_jpeg

    for split, count in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            for i in range(count):
                write_jpeg(root / split / name / f"{i}.jpg", seed=100 * c + i)
    return root


def test_an_imagefolder_target_is_named_after_its_folder_unless_target_name_is_given(compose_cfg, tmp_path):
    cfg = compose_cfg("target=imagefolder", f"target.root={tmp_path / 'ants_bees'}")
    assert cfg.target.name == "ants_bees" and cfg.results.table == "ants_bees"
    assert compose_cfg("target=imagefolder", f"target.root={tmp_path / 'ants_bees'}/").target.name == "ants_bees"
    named = compose_cfg("target=imagefolder", f"target.root={tmp_path / 'ants_bees'}", "target.name=hymenoptera")
    assert named.target.name == "hymenoptera" and named.results.table == "hymenoptera"


def test_two_imagefolder_roots_are_two_rows_of_one_paper_table(compose_cfg, tmp_path):
    """A sweep over two target.roots: each dataset its own row, not one cell with two settings."""
    from safetransfer.job.run import run_job

    shrink = [o for o in TINY if not o.startswith("target.")]
    for number, folder in enumerate(("ants_bees", "cats_dogs")):
        root = _image_folder(tmp_path / "data" / folder)
        cfg = compose_cfg(
            *shrink,
            "source=scratch",
            "target=imagefolder",
            f"target.root={root}",
            "train.batch_size=4",
            "results.table=mine",
            "runtime.log_every=0",
            "runtime.diagnostics_every=0",
            "runtime.spectrum_batches=0",
        )
        run_job(cfg, tmp_path / "sweep" / str(number))
    markdown = (tmp_path / "results" / "mine_paper.md").read_text()
    rows = {line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")}
    assert {"ants_bees", "cats_dogs"} <= rows


def test_a_folder_link_looping_inside_an_imagefolder_is_not_followed_and_is_counted(tmp_path, caplog):
    """`ln -s . train/ants/loop` made torchvision's walk (followlinks=True) read the ants again at
    every turn of the loop: 40 training images became 840. A link to a folder outside the tree is
    still followed (class folders linked to where the images lie), once; the order of the images
    is torchvision's wherever there is no loop (names such as sub and sub-a sort as its walk sorts)."""
    import os

    from torchvision.datasets import ImageFolder

    from safetransfer.data.targets.imagefolder import ImageFolderTarget

    root = tmp_path / "hymenoptera"
    for split in ("train", "test"):
        for name in ("ants", "bees"):
            for i in range(4):
                fixtures.write_jpeg(root / split / name / f"{i}.jpg", seed=i)
    for sub in ("sub", "sub-a"):  # nested folders whose names sort differently as paths and as names
        fixtures.write_jpeg(root / "train" / "ants" / sub / "x.jpg", seed=9)
    elsewhere = tmp_path / "more_bees"
    fixtures.write_jpeg(elsewhere / "b.jpg", seed=7)
    os.symlink(elsewhere, root / "train" / "bees" / "linked")  # outside the tree: followed
    reference = [(os.path.relpath(p, root), c) for p, c in ImageFolder(str(root / "train")).samples]
    assert len(reference) == 4 + 2 + 4 + 1

    os.symlink(".", root / "train" / "ants" / "loop")  # inside the tree: a loop
    os.symlink(elsewhere, elsewhere / "round")  # a loop outside the tree, reached through bees/linked
    assert len(ImageFolder(str(root / "train")).samples) > 100  # what torchvision makes of them
    os.symlink("../..", root / "train" / "bees" / "up")  # to the dataset's root: the test images would come in
    os.symlink(tmp_path, elsewhere / "wider")  # outside, but holding what bees/linked read already
    caplog.set_level("WARNING")
    target = ImageFolderTarget(str(root), name="hymenoptera")
    samples = [(os.path.relpath(p, root), c) for p, c in target.train_set().samples]
    assert samples == reference
    skipped = {os.path.basename(link) for link, _, _ in target.train_set().skipped}
    assert skipped == {"loop", "up", "round", "wider"}
    loop = next(n for link, _, n in target.train_set().skipped if link.endswith("loop"))
    assert loop == 6  # the ants' 4 + 2 nested
    assert "4 folder links not followed" in caplog.text


def test_an_imagefolder_whose_test_split_is_called_val_takes_target_test_dir(compose_cfg, tmp_path):
    """torchvision's transfer-learning tutorial data (hymenoptera_data) comes as train/ and val/: the
    missing test/ names the folder it found and the key that takes it; with it the images are read."""
    from safetransfer.common.errors import MissingData
    from safetransfer.common.fingerprints import config_key, decisive

    root = _image_folder(tmp_path / "hymenoptera_data")
    (root / "test").rename(root / "val")
    plain = compose_cfg("target=imagefolder", f"target.root={root}")
    with pytest.raises(MissingData, match="its test images are in val/\\? set target.test_dir=val"):
        build("target", plain.target, "target").check()
    given = compose_cfg("target=imagefolder", f"target.root={root}", "target.test_dir=val")
    target = build("target", given.target, "target")
    target.check()
    assert len(target.test_set()) == len(list((root / "val").rglob("*.jpg"))) > 0
    # the key of a result that predates the option: the default leaves it out, another value is keyed
    assert "test_dir" not in decisive(plain)["target"] and config_key(given) != config_key(plain)
