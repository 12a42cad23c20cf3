"""Training augmentation done on the device: the random crop and mirror of
targets.augment_transform, and the normalisation, applied to whole uint8 batches read from
the decoded-image cache (data.augment_on)."""

from __future__ import annotations

import torch


class DeviceAugment:
    """The random crop and mirror of the training transform, and the normalisation, done
    on a whole uint8 batch where it lives (the GPU when training there), so that loader
    workers only copy cached bytes. Draws come from its own generator, seeded per seed."""

    def __init__(self, crop: int, mean, std, seed: int, device: torch.device, train: bool = True):
        self.crop, self.train, self.device = crop, train, device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def offsets(self, batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top and left corners of each sample's crop, and whether it is mirrored."""
        top = torch.randint(0, height - self.crop + 1, (batch,), device=self.device, generator=self.generator)
        left = torch.randint(0, width - self.crop + 1, (batch,), device=self.device, generator=self.generator)
        flip = torch.rand(batch, device=self.device, generator=self.generator) < 0.5
        return top, left, flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.train:
            batch, _, height, width = images.shape
            top, left, flip = self.offsets(batch, height, width)
            steps = torch.arange(self.crop, device=self.device)
            rows = (top[:, None] + steps)[:, :, None]                          # (B, crop, 1)
            columns = left[:, None] + steps                                     # (B, crop)
            columns = torch.where(flip[:, None], columns.flip(1), columns)[:, None, :]  # mirrored: read right to left
            images = images[torch.arange(batch, device=self.device)[:, None, None], :, rows, columns]  # (B, crop, crop, C)
            images = images.permute(0, 3, 1, 2)
        return (images.float() / 255 - self.mean) / self.std
