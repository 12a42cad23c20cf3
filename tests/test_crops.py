"""The BSS authors' data options: RandomResizedCrop training crops and ten test crops,
checked against hand-indexed NumPy crops and a by-hand average of the views' logits."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms import v2

import fixtures
from conftest import TINY
from safetransfer.data import transforms
from safetransfer.data.datasets import Transformed
from safetransfer.data.targets.cub200 import CUB200
from safetransfer.data.transforms import augment_transform, train_transform
from safetransfer.training.engine import evaluate

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]


def square(resize, seed=0):
    """A uint8 image already resized to resize x resize."""
    return torch.randint(0, 256, (3, resize, resize), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalized(pixels):
    return (pixels.astype(np.float64) / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]


def test_ten_test_crops_are_corners_and_centre_each_mirrored():
    resize, crop = 12, 8
    image = square(resize)
    views = transforms.test_transform(resize, crop, MEAN, STD, test_crops=10)(v2.functional.to_pil_image(image))
    assert views.shape == (10, 3, crop, crop)
    x = image.numpy()
    centre = int(round((resize - crop) / 2))
    corners = [(0, 0), (0, resize - crop), (resize - crop, 0), (resize - crop, resize - crop), (centre, centre)]
    expected = [x[:, t : t + crop, l : l + crop] for t, l in corners]
    mirrored = x[:, :, ::-1]
    expected += [mirrored[:, t : t + crop, l : l + crop] for t, l in corners]
    for view, pixels in zip(views, expected):
        np.testing.assert_allclose(view.numpy(), normalized(pixels), atol=1e-6)
    assert not np.allclose(views[0].numpy(), views[5].numpy())  # the mirrored corner differs


def test_random_resized_crop_option_draws_torchvision_windows_of_the_square():
    resize, crop = 40, 16
    image = square(resize, seed=1)
    torch.manual_seed(3)
    got = augment_transform(crop, MEAN, STD, "random_resized_crop")(image)
    torch.manual_seed(3)
    window = v2.RandomResizedCrop(crop, antialias=True)(image)
    flipped = v2.RandomHorizontalFlip()(window)
    assert torch.allclose(got, v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(flipped)))
    # a plain random crop takes an unscaled window: its pixels are a sub-block of the image
    torch.manual_seed(3)
    plain = augment_transform(crop, MEAN, STD, "random_crop")(image)
    x, p = normalized(image.numpy()), plain.numpy()
    blocks = [x[:, t : t + crop, l : l + crop] for t in range(resize - crop + 1) for l in range(resize - crop + 1)]
    assert any(np.allclose(p, b, atol=1e-6) or np.allclose(p, b[:, :, ::-1], atol=1e-6) for b in blocks)
    assert train_transform(resize, crop, MEAN, STD, "random_resized_crop")(v2.functional.to_pil_image(image)).shape == (
        3,
        crop,
        crop,
    )


def test_evaluation_averages_the_logits_of_the_views():
    torch.manual_seed(0)
    from safetransfer.training.backbones import TransferNet

    model = TransferNet("resnet18", 4).eval()
    images = torch.randn(3, 10, 3, 32, 32)
    labels = torch.tensor([0, 1, 3])
    with torch.no_grad():
        logits = torch.stack([model(images[:, v])[0] for v in range(10)]).mean(0)
    expected_top1 = 100.0 * float((logits.argmax(1) == labels).float().mean())
    expected_loss = float(torch.nn.functional.cross_entropy(logits, labels))
    top1, loss = evaluate(model, [(images, labels)], torch.device("cpu"))
    assert top1 == pytest.approx(expected_top1) and loss == pytest.approx(expected_loss, rel=1e-5)


def cub_config(tmp_path, **data):
    """The keys the data preparation reads, for the CUB fixture under tmp_path/data at 48 -> 40 px."""
    return OmegaConf.create(
        {
            "train": {"batch_size": 2},
            "target": {"name": "cub200", "root": str(tmp_path / "data"), "sampling_rate": 100},
            "data": {"resize": 48, "crop": 40, "mean": MEAN, "std": STD, **data},
            "paths": {"cache_dir": str(tmp_path / "cache")},
            "runtime": {"num_workers": 0, "device": "cpu"},
        }
    )


def test_cached_ten_crops_equal_the_direct_path(tmp_path):
    from safetransfer.data.preparation import cached_data

    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=5, test_per_class=2)
    target = CUB200(str(tmp_path / "data"), expected_classes=3, expected_split=(15, 6))
    cfg = cub_config(tmp_path, cache=True, test_crops=10, train_crop="random_resized_crop")
    _, cached_test = cached_data(cfg, target.train_set(), target.test_set(), np.arange(15))
    direct = Transformed(target.test_set(), range(6), transforms.test_transform(48, 40, MEAN, STD, test_crops=10))
    for i in range(6):
        assert cached_test[i][0].shape == (10, 3, 40, 40)
        assert torch.equal(direct[i][0], cached_test[i][0])


def test_a_run_with_the_bss_data_options_scores_ten_crops(cli, tmp_path):
    result = cli(
        "experiment=demo",
        "hydra.mode=RUN",
        "method=fine_tuning",
        *TINY,
        "source=scratch",
        "data.train_crop=random_resized_crop",
        "data.test_crops=10",
        "hydra.run.dir=run",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "seed_0" / "metrics.json").read_text())
    assert metrics["config"]["data"]["test_crops"] == 10 and metrics["test_images"] > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.test_crops=5", "data.test_crops=5 is not a known choice; allowed: 1, 10"),
        (
            "data.train_crop=center",
            "data.train_crop=center is not a known choice; allowed: random_crop, random_resized_crop",
        ),
    ],
)
def test_bad_crop_options_are_one_line(compose_cfg, override, message):
    from safetransfer.common.errors import ConfigError
    from safetransfer.job.checks import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(compose_cfg(override))


@pytest.mark.parametrize("test_resize", ["square", "shorter_side"])
def test_one_test_view_is_torchvisions_resize_then_centre_crop_on_a_non_square_image(tmp_path, test_resize):
    """The DTNH text's test transform (every image to 256 x 256, then the centre crop; here 48
    and 40) against torchvision's v2.Resize((48, 48)) and v2.CenterCrop(40), on photos 70 x 44
    (another aspect ratio); shorter_side against v2.Resize(48). Both data paths: the decoded
    cache and the direct transform."""
    from PIL import Image

    from safetransfer.data.preparation import prepare_data

    fixtures.make_cub200(tmp_path / "data", classes=2, train_per_class=4, test_per_class=2)
    for path in (tmp_path / "data" / "CUB_200_2011" / "images").rglob("*.jpg"):  # a wide photo instead
        pixels = np.random.default_rng(len(path.name)).integers(0, 256, (44, 70, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    size = (48, 48) if test_resize == "square" else 48
    expected_transform = v2.Compose(
        [v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(40), v2.ToDtype(torch.float32, scale=True)]
    )
    target = CUB200(str(tmp_path / "data"), expected_classes=2, expected_split=(8, 4))
    for cache in (True, False):
        cfg = cub_config(tmp_path, cache=cache, test_resize=test_resize, augment_on="workers", on_device=False)
        data = prepare_data(cfg, target)
        for i in range(4):
            image, label = target.test_set()[i]
            pixels = expected_transform(image)
            expected = (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
            got, got_label = data.test[i]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            assert got_label == label
    square_view = v2.Compose([v2.Resize((48, 48), antialias=True), v2.CenterCrop(40)])(v2.ToImage()(image))
    shorter_view = v2.Compose([v2.Resize(48, antialias=True), v2.CenterCrop(40)])(v2.ToImage()(image))
    assert not torch.equal(square_view, shorter_view)  # the two choices differ on this photo


def test_the_dtnh_presets_resize_test_images_to_a_square_and_keep_mean_and_std(compose_cfg):
    cfg = compose_cfg("experiment=dtnh_table2", "target=flowers102")
    assert cfg.data.test_resize == "square" and (cfg.data.resize, cfg.data.crop) == (256, 224)
    assert list(cfg.data.std) == [0.229, 0.224, 0.225]
