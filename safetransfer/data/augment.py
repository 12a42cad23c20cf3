"""Training augmentation done on the device: the random crop (or random resized crop) and
mirror of targets.augment_transform, the test views of targets.views_transform, and the
normalisation, applied to whole uint8 batches read from the decoded-image cache
(data.augment_on)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE, RATIO, ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10  # torchvision's RandomResizedCrop defaults


#: data.augment_on: the GPU when training there from the cache (auto), the device always
#: (device: DeviceAugment, any train crop and test views), or the loader workers (torchvision's own)
AUGMENT_ON = ("auto", "device", "workers")


class DeviceAugment:
    """The training transform's random window and mirror, or the test views, and the
    normalisation, done on a whole uint8 batch where it lives (the GPU when training there),
    so that loader workers only copy cached bytes. Draws come from its own generator,
    seeded per seed.

    train_crop `random_crop`: a crop x crop window; `random_resized_crop`: torchvision's
    RandomResizedCrop(crop) (area 8-100 % of the image, aspect ratio 3/4-4/3, ten tries then
    the centre), resized by bilinear interpolation without antialiasing (torchvision
    antialiases when it shrinks: at the BSS protocol's 256 px images a window shrinks by at
    most 256/224; on smooth photos the two differ by under half a grey level on average).
    test_crops 10: the four corners and the centre, each also mirrored (torchvision's
    TenCrop), as (B, 10, 3, crop, crop). `views` > 1 (training): that many independent draws of each
    image, as (B, views, 3, crop, crop): Bi-Tuning's query and key views."""

    def __init__(
        self,
        crop: int,
        mean,
        std,
        seed: int,
        device: torch.device,
        train: bool = True,
        train_crop: str = "random_crop",
        test_crops: int = 1,
        views: int = 1,
    ):
        self.crop, self.train, self.device, self.views = crop, train, device, views
        self.train_crop, self.test_crops = train_crop, test_crops
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, device=self.device, generator=self.generator)

    def offsets(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top and left corners of each sample's crop, and whether it is mirrored."""
        top = torch.randint(0, height - self.crop + 1, (batch,), device=self.device, generator=self.generator)
        left = torch.randint(0, width - self.crop + 1, (batch,), device=self.device, generator=self.generator)
        return top, left, self.uniform(batch) < 0.5

    def boxes(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """RandomResizedCrop's windows (top, left, height, width), for every sample at once,
        and whether each is mirrored: of ten tries (an area fraction uniform in SCALE, the log
        of the aspect ratio uniform in log RATIO) the first that fits, else the centre crop of
        the largest window of an allowed aspect ratio."""
        area = height * width * (SCALE[0] + (SCALE[1] - SCALE[0]) * self.uniform(batch, ATTEMPTS))
        low, high = math.log(RATIO[0]), math.log(RATIO[1])
        ratio = torch.exp(low + (high - low) * self.uniform(batch, ATTEMPTS))
        w, h = torch.sqrt(area * ratio).round().long(), torch.sqrt(area / ratio).round().long()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
        w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
        if width / height < RATIO[0]:
            fallback = (round(width / RATIO[0]), width)
        elif width / height > RATIO[1]:
            fallback = (height, round(height * RATIO[1]))
        else:
            fallback = (height, width)
        h, w = torch.where(found, h, fallback[0]), torch.where(found, w, fallback[1])
        top = torch.where(found, (self.uniform(batch) * (height - h + 1)).long(), (height - h) // 2)
        left = torch.where(found, (self.uniform(batch) * (width - w + 1)).long(), (width - w) // 2)
        return top, left, h, w, self.uniform(batch) < 0.5

    def resized_crops(self, images: torch.Tensor) -> torch.Tensor:
        """Each sample's window resized to crop x crop (and mirrored) by one grid_sample: the
        coordinates F.interpolate(bilinear, align_corners=False) reads, clamped to the window."""
        batch, _, height, width = images.shape
        top, left, h, w, flip = self.boxes(batch, height, width)
        steps = (torch.arange(self.crop, device=self.device) + 0.5) / self.crop

        def coordinates(start, size, extent):  # pixel coordinates in the image, normalised for grid_sample
            x = (start[:, None] + steps * size[:, None] - 0.5).clamp(min=start[:, None].float())
            x = torch.minimum(x, (start + size - 1)[:, None].float())
            return (2 * x + 1) / extent - 1

        x, y = coordinates(left, w, width), coordinates(top, h, height)
        x = torch.where(flip[:, None], x.flip(1), x)
        grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), dim=-1)  # (B, crop, crop, 2)
        return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

    def windows(self, images: torch.Tensor) -> torch.Tensor:
        """Each sample's crop x crop window, mirrored or not, by one gather."""
        batch, _, height, width = images.shape
        top, left, flip = self.offsets(batch, height, width)
        steps = torch.arange(self.crop, device=self.device)
        rows = (top[:, None] + steps)[:, :, None]  # (B, crop, 1)
        columns = left[:, None] + steps  # (B, crop)
        columns = torch.where(flip[:, None], columns.flip(1), columns)[:, None, :]  # mirrored: read right to left
        images = images[torch.arange(batch, device=self.device)[:, None, None], :, rows, columns]  # (B, crop, crop, C)
        return images.permute(0, 3, 1, 2)

    def ten_crops(self, images: torch.Tensor) -> torch.Tensor:
        """TenCrop: top left, top right, bottom left, bottom right, centre, then the same of
        the mirrored image; (B, 10, C, crop, crop)."""
        height, width, c = images.shape[-2], images.shape[-1], self.crop
        corners = [
            (0, 0),
            (0, width - c),
            (height - c, 0),
            (height - c, width - c),
            (int(round((height - c) / 2)), int(round((width - c) / 2))),
        ]
        views = [image[..., t : t + c, l : l + c] for image in (images, images.flip(-1)) for t, l in corners]
        return torch.stack(views, dim=1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.train and self.views > 1:  # independent draws of each image, (B, views, 3, crop, crop)
            return torch.stack([self.augment(images) for _ in range(self.views)], dim=1)
        return self.augment(images)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.train:
            images = self.resized_crops(images) if self.train_crop == "random_resized_crop" else self.windows(images)
        elif self.test_crops == 10:
            views = self.ten_crops(images)
            return self.normalise(views.flatten(0, 1)).view(views.shape)
        return self.normalise(images)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std
