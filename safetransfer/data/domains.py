"""Procedurally generated source and target domains for the embedded demo.

Both domains draw the same six shapes at random positions, sizes and colours on
noisy backgrounds, but they differ in style and label set:

* source domain: 12 classes = 6 shapes x 2 grating orientations, filled shapes;
* target domain: 6 classes = the 6 shapes drawn as hollow outlines in another
  palette, with no grating.

A network pretrained on the source learns shape detectors that a few target
images per class are enough to re-use, while a network trained from scratch on
those few images cannot learn them in the demo's short schedule: transfer
visibly helps. Everything is generated from a seed, so no download is needed.
"""

from __future__ import annotations

import math

import torch

VERSION = 1  # bump when the images change, so that cached demo source models are rebuilt
SHAPES = ("circle", "square", "diamond", "cross", "triangle", "ellipse")
SOURCE_CLASSES = tuple(f"{shape}-{grating}" for shape in SHAPES for grating in ("horizontal", "vertical"))
TARGET_CLASSES = tuple(f"{shape}-outline" for shape in SHAPES)


def _shape_level(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """A level function that is <= 1 inside the shape and grows outwards (dx, dy in radii)."""
    ax, ay = dx.abs(), dy.abs()
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2)
    if shape == "square":
        return torch.maximum(ax, ay) / 0.8
    if shape == "diamond":
        return (ax + ay) / 1.15
    if shape == "cross":
        arm_x = torch.maximum(ax / 0.32, ay)
        arm_y = torch.maximum(ay / 0.32, ax)
        return torch.minimum(arm_x, arm_y)
    if shape == "triangle":
        # apex up: the half-width grows linearly from the apex (dy = -1) to the base (dy = 0.8)
        return torch.maximum(dy / 0.8, 2 * ax / (dy + 1.0).clamp_min(1e-3))
    if shape == "ellipse":
        return torch.sqrt(dx**2 + (dy / 0.45) ** 2)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(
    shape_ids: torch.Tensor,
    *,
    outline: bool,
    grating: torch.Tensor | None,
    palette: str,
    size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw one shape per image; returns uint8 images of shape (N, 3, size, size)."""
    n = shape_ids.numel()
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    radius = size * (0.22 + 0.12 * u(n))
    margin = radius + 1
    cx = margin + (size - 2 * margin) * u(n)
    cy = margin + (size - 2 * margin) * u(n)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = (coords.view(1, 1, size) - cx.view(n, 1, 1)) / radius.view(n, 1, 1)
    dy = (coords.view(1, size, 1) - cy.view(n, 1, 1)) / radius.view(n, 1, 1)

    level = torch.empty(n, size, size)
    for index, shape in enumerate(SHAPES):
        chosen = shape_ids == index
        if chosen.any():
            level[chosen] = _shape_level(shape, dx[chosen], dy[chosen])
    mask = level <= 1.0
    if outline:
        mask &= level >= 0.72
    mask = mask.float()

    if grating is not None:
        # vertical gratings vary along x, horizontal ones along y
        phase = 2 * math.pi * u(n).view(n, 1, 1)
        along = torch.where(grating.view(n, 1, 1).bool(), dx * radius.view(n, 1, 1), dy * radius.view(n, 1, 1))
        texture = 0.6 + 0.4 * torch.sin(2 * math.pi * along / 4.0 + phase)
    else:
        texture = torch.ones(n, size, size)

    if palette == "warm":
        foreground = torch.stack([0.7 + 0.3 * u(n), 0.2 + 0.5 * u(n), 0.1 * u(n)], dim=1)
    elif palette == "cool":
        foreground = torch.stack([0.1 * u(n), 0.3 + 0.5 * u(n), 0.6 + 0.4 * u(n)], dim=1)
    else:
        raise ValueError(f"unknown palette {palette!r}; known: warm, cool")
    background = 0.15 + 0.5 * u(n, 1).expand(n, 3) + 0.1 * (u(n, 3) - 0.5)

    alpha = (mask * texture).unsqueeze(1)
    image = background.view(n, 3, 1, 1) * (1 - alpha) + foreground.view(n, 3, 1, 1) * alpha
    image = image + 0.06 * torch.randn(n, 3, size, size, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def make_domain(
    domain: str, images_per_class: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images (N, 3, size, size) uint8, labels (N,) and class names of the source or target domain."""
    generator = torch.Generator().manual_seed(seed)
    if domain == "source":
        classes = SOURCE_CLASSES
        labels = torch.arange(len(classes)).repeat_interleave(images_per_class)
        images = render(labels // 2, outline=False, grating=labels % 2, palette="warm", size=size, generator=generator)
    elif domain == "target":
        classes = TARGET_CLASSES
        labels = torch.arange(len(classes)).repeat_interleave(images_per_class)
        images = render(labels, outline=True, grating=None, palette="cool", size=size, generator=generator)
    else:
        raise ValueError(f"unknown demo domain {domain!r}; known: source, target")
    return images, labels, classes
