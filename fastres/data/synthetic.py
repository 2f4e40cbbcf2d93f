"""A deterministic, learnable stand-in for CIFAR-10 (for machines without the data set).

Each class is a fixed random smooth colour field plus a mid-frequency
texture, larger than the image. An image is its class template cropped at a
random offset and maybe mirrored, blended with a weaker template of another
class, with random contrast, colour cast, smooth noise and pixel noise. A
small ResNet learns it well above chance within a few hundred steps, but the
blending and noise keep it from being trivially separable.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .cifar import CIFAR10_CLASSES, Dataset
from .loader import _window

__all__ = ["synthetic_cifar10"]

_NUM_CLASSES = 10
_CHUNK = 4096
_NOISE_BANK = 1024


def _generator(seed: int, stream: str) -> torch.Generator:
    # Separate streams: the test set does not change with num_train, nor the templates with either.
    digest = hashlib.sha256(f"fastres.synthetic:{stream}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _smooth(gen: torch.Generator, shape: tuple[int, ...], size: int) -> torch.Tensor:
    """Unit-variance-ish smooth random field: coarse Gaussian noise upsampled bicubically to size x size."""
    coarse = torch.randn(shape, generator=gen)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def _templates(seed: int, size: int) -> torch.Tensor:
    gen = _generator(seed, "templates")
    colour = 128.0 + 45.0 * torch.randn(_NUM_CLASSES, 3, 1, 1, generator=gen)
    blobs = 30.0 * _smooth(gen, (_NUM_CLASSES, 3, 4, 4), size)        # class-specific colour layout
    texture = 25.0 * _smooth(gen, (_NUM_CLASSES, 1, 9, 9), size)      # class-specific luminance pattern
    return colour + blobs + texture


def _all_views(templates: torch.Tensor, image_size: int) -> torch.Tensor:
    """Every crop (each offset, mirrored or not) of every template: ``[K, views, 3, S, S]``.

    Sampling an image then is a row copy (index_select), much faster on CPU than a per-pixel gather.
    """
    k, span = templates.shape[0], templates.shape[-1] - image_size + 1
    oy, ox, flip = (t.flatten() for t in torch.meshgrid(
        torch.arange(span), torch.arange(span), torch.arange(2), indexing="ij"))
    flip = flip.bool()
    views = oy.numel()
    which = torch.arange(k).repeat_interleave(views)
    crops = _window(templates, which, oy.repeat(k), ox.repeat(k), flip.repeat(k), image_size, image_size)
    return crops.reshape(k, views, 3, image_size, image_size)


def _sample(
    views: torch.Tensor, noise_bank: torch.Tensor, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    # Exactly balanced labels (counts differ by at most one), in random order.
    labels = (torch.arange(n) % _NUM_CLASSES)[torch.randperm(n, generator=gen)]
    k, per_class = views.shape[:2]
    flat_views = views.flatten(0, 1)
    images = torch.empty(n, *views.shape[2:], dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        y = labels[start:start + _CHUNK]
        b = y.shape[0]

        def view_of(cls: torch.Tensor) -> torch.Tensor:
            # A random shift and mirror of the class template.
            return flat_views.index_select(0, cls * per_class + torch.randint(0, per_class, (b,), generator=gen))

        other = (y + torch.randint(1, k, (b,), generator=gen)) % k
        w = 0.45 * torch.rand(b, 1, 1, 1, generator=gen)              # weight of the distractor class
        contrast = 0.6 + 0.7 * torch.rand(b, 1, 1, 1, generator=gen)
        cast = 20.0 * torch.randn(b, 3, 1, 1, generator=gen)          # per-image colour cast
        # 128 + contrast * ((1-w) * main + w * distractor - 128) + cast + noise, in few in-place passes.
        x = view_of(y).mul_(contrast * (1.0 - w))
        x.addcmul_(view_of(other), contrast * w)
        x.add_(128.0 * (1.0 - contrast) + cast)
        x.add_(noise_bank.index_select(0, torch.randint(0, noise_bank.shape[0], (b,), generator=gen)))
        x.add_(torch.randn(x.shape, generator=gen), alpha=18.0)
        images[start:start + b] = x.round_().clamp_(0, 255).to(torch.uint8)
    return images, labels


def synthetic_cifar10(num_train: int = 50000, num_test: int = 10000, seed: int = 0, image_size: int = 32) -> Dataset:
    """A CIFAR-shaped synthetic data set (uint8 ``[N, 3, S, S]``, 10 balanced classes), a pure function of its arguments.

    ``source="synthetic"``, ``classes`` are CIFAR-10's names. The test set
    depends only on ``seed``, ``num_test`` and ``image_size``.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train}, {num_test}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    # Shifts of up to 2 * margin pixels, like the pad-4 crop at 32; capped so the views stay small.
    margin = min(4, max(1, image_size // 8))
    views = _all_views(_templates(seed, image_size + 2 * margin), image_size)
    # Smooth per-image noise comes from a fixed bank: upsampling fresh noise per image would dominate the run time.
    noise_bank = 20.0 * _smooth(_generator(seed, "noise"), (_NOISE_BANK, 3, 3, 3), image_size)
    train_x, train_y = _sample(views, noise_bank, num_train, _generator(seed, "train"))
    test_x, test_y = _sample(views, noise_bank, num_test, _generator(seed, "test"))
    return Dataset(train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES), "synthetic")
