"""The image transforms: the deterministic part of each split (decoded once, and cached by
data/cache.py), the training augmentation, the test views and the normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_transform(
    split: str, resize: int, crop: int, test_crops: int = 1, test_resize: str = "square"
) -> v2.Compose:
    """The deterministic part of each split's transform, ending in uint8 pixels. Ten test
    crops are taken from the image resized to resize x resize (the BSS authors' code); one
    test view is the centre crop of the image resized as `test_resize` says (TEST_RESIZES)."""
    if split == "train" or test_crops != 1:
        return v2.Compose([v2.ToImage(), v2.Resize((resize, resize), antialias=True)])
    size = (resize, resize) if test_resize == "square" else resize
    return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(crop)])


TRAIN_CROPS = ("random_crop", "random_resized_crop")


TEST_CROPS = (1, 10)


#: data.test_resize, how an image is resized before its one centre crop: square, to resize x
#: resize (the DTNH text: every image "re-sized to 256 x 256"; the BSS authors' ResizeImage) |
#: shorter_side, the shorter side to resize with the aspect ratio kept (torchvision's ImageNet
#: evaluation; safetransfer's test transform before it followed the DTNH text)
TEST_RESIZES = ("square", "shorter_side")


def crop_options(data) -> tuple[str, int, str]:
    """(data.train_crop, data.test_crops, data.test_resize), their defaults where a config has none."""
    return (
        data.get("train_crop", TRAIN_CROPS[0]),
        data.get("test_crops", TEST_CROPS[0]),
        data.get("test_resize", "square"),
    )


def train_transform(
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    train_crop: str = "random_crop",
    views: int = 1,
) -> v2.Compose:
    """Resize to resize x resize, random crop (or random resized crop), random mirror, normalise;
    `views` > 1: that many independent draws of the random part, stacked (views, 3, crop, crop)."""
    return v2.Compose([decode_transform("train", resize, crop), augment_transform(crop, mean, std, train_crop, views)])


def test_transform(
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    test_crops: int = 1,
    test_resize: str = "square",
) -> v2.Compose:
    """1 crop: resize (to resize x resize, or the shorter side to resize), centre crop, normalise.
    10 crops: resize x resize, the four corners and the centre, each also mirrored, stacked as
    (10, 3, crop, crop)."""
    return v2.Compose(
        [decode_transform("test", resize, crop, test_crops, test_resize), views_transform(crop, mean, std, test_crops)]
    )


def augment_transform(
    crop: int, mean: Sequence[float], std: Sequence[float], train_crop: str = "random_crop", views: int = 1
):
    """The random part of the training transform, on uint8 images already resized to a square.
    random_crop: a crop x crop window (the DTNH protocol); random_resized_crop: torchvision's
    RandomResizedCrop(crop), scale (0.08, 1) and aspect ratio (3/4, 4/3) of that square, as the
    BSS authors' released code (ResizeImage(256) then RandomResizedCrop(224))."""
    window = v2.RandomResizedCrop(crop, antialias=True) if train_crop == "random_resized_crop" else v2.RandomCrop(crop)
    augment = v2.Compose([window, v2.RandomHorizontalFlip(), normalize_transform(mean, std)])
    return augment if views == 1 else Views(augment, views)


class Views:
    """`count` independent draws of `transform` on one image, stacked (count, 3, H, W): the two views of
    each training image that Bi-Tuning's query and key encoders see (TLlib's MultipleApply)."""

    def __init__(self, transform, count: int):
        self.transform, self.count = transform, count

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image).as_subclass(torch.Tensor) for _ in range(self.count)])


def views_transform(crop: int, mean: Sequence[float], std: Sequence[float], test_crops: int = 1):
    """The test-time views of an image already resized (and centre-cropped for one view)."""
    if test_crops == 1:
        return normalize_transform(mean, std)
    return v2.Compose([v2.TenCrop(crop), stack_views, normalize_transform(mean, std)])


def stack_views(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """TenCrop's tuple of views as one (views, 3, H, W) tensor."""
    return torch.stack([v.as_subclass(torch.Tensor) for v in views])


def normalize_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
