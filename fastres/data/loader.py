"""Device-resident batching, normalisation and the notes' augmentation.

The whole uint8 data set lives on the device (CIFAR-10's 50,000 training
images are 150 MB), so an epoch is a permutation plus one gather, crop and
normalise per batch: no worker processes, no host-to-device copies per batch.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["GPULoader", "augment", "channel_stats"]


def channel_stats(
    images_uint8: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``images / 255`` for ``[N, C, H, W]`` images.

    Sums are taken in float64 over chunks of ``chunk`` images, so no
    temporary is larger than one chunk (uint8 values make the sums exact).
    """
    if images_uint8.dim() != 4:
        raise ValueError(f"channel_stats expects [N, C, H, W] images, got shape {list(images_uint8.shape)}")
    n, c = images_uint8.shape[:2]
    if images_uint8.numel() == 0:
        raise ValueError("channel_stats needs at least one image")
    total = torch.zeros(c, dtype=torch.float64, device=images_uint8.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, n, chunk):
        x = images_uint8[start:start + chunk].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images_uint8.numel() // c
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    mean, std = (mean / 255.0).tolist(), (var.sqrt() / 255.0).tolist()
    return tuple(mean), tuple(std)


def _draw(count: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets in [0, 2*padding] and flip flags for ``count`` images, on the generator's device."""
    dev = generator.device
    oy = torch.randint(0, 2 * padding + 1, (count,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (count,), generator=generator, device=dev)
    flip = torch.randint(0, 2, (count,), generator=generator, device=dev).bool()
    return oy, ox, flip


def _window(
    src: torch.Tensor, which: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Out[i] = src[which[i]] cropped to h x w at (oy[i], ox[i]), mirrored where flip[i]: one gather."""
    dev = src.device
    rows = oy.to(dev)[:, None] + torch.arange(h, device=dev)     # [B, h]
    cols = ox.to(dev)[:, None] + torch.arange(w, device=dev)     # [B, w]
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)  # mirror inside the crop window
    ci = torch.arange(src.shape[1], device=dev)[None, :, None, None]
    return src[which.to(dev)[:, None, None, None], ci, rows[:, None, :, None], cols[:, None, None, :]]


def _crop_flip(
    images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop each image back to HxW at its own (oy, ox), mirror where ``flip``."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    return _window(padded, torch.arange(b, device=images.device), oy, ox, flip, h, w)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The notes' augmentation for a batch ``[B, C, H, W]`` (uint8 or float, any device).

    Zero-pads by ``padding``, crops back to HxW at an independent random
    offset per image and flips each image horizontally with probability 0.5,
    in a few batched ops. Randomness comes from ``generator`` (CPU or the
    images' device); the result is a new NCHW-contiguous tensor of the input dtype.
    """
    if images.dim() != 4:
        raise ValueError(f"augment expects [B, C, H, W] images, got shape {list(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    oy, ox, flip = _draw(images.shape[0], padding, generator)
    return _crop_flip(images, oy, ox, flip, padding)


def _epoch_seed(seed: int, epoch: int, stream: str) -> int:
    # A hash rather than seed * K + epoch: distinct (seed, epoch) pairs never share a stream.
    digest = hashlib.sha256(f"fastres.data:{stream}:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GPULoader:
    """Batches of a uint8 image set held on ``device``, normalised, augmented when training.

    ``train=True`` shuffles every epoch and applies :func:`augment`;
    ``train=False`` keeps the order and does not augment. ``drop_last``
    (default: ``train``) drops the last partial batch. Each pass over the
    loader advances the epoch by one; :meth:`set_epoch` picks the epoch of
    the next pass (to resume), and all randomness is a pure function of
    ``(seed, epoch)``, drawn on the CPU so results do not depend on the device.

    With ``world_size > 1`` every rank draws the same permutation and takes
    positions ``rank, rank + world_size, ...`` of it, like
    ``DistributedSampler``: with ``drop_last`` the tail that does not divide
    evenly is dropped, otherwise the permutation is padded by wrapping
    around, so all ranks yield the same number of batches.

    Pass the training set's ``mean``/``std`` to the test loader: by default
    they are the statistics of the images this loader is given.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        device: str | torch.device = "cuda" if torch.cuda.is_available() else "cpu",
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        padding: int = 4,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be [N] with N = {images.shape[0]}, got shape {list(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.dtype = dtype
        self.channels_last = channels_last
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        self.padding = padding
        self.epoch = 0

        if mean is None or std is None:
            stats_mean, stats_std = channel_stats(images)
            mean = stats_mean if mean is None else mean
            std = stats_std if std is None else std
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} values each, got {len(mean)} and {len(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # (x/255 - mean)/std == x * scale + shift: one multiply-add per element, in float32.
        std_t = torch.tensor(self.std, dtype=torch.float64)
        mean_t = torch.tensor(self.mean, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, c, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).to(torch.float32).view(1, c, 1, 1).to(self.device)

        # One copy to the device for the whole run.
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(device=self.device, dtype=torch.int64)

        n = images.shape[0]
        if self.drop_last and n % world_size:
            per_rank = n // world_size
        else:
            per_rank = math.ceil(n / world_size)
        self._per_rank = per_rank                      # positions of the permutation this rank owns
        self._batches = per_rank // batch_size if self.drop_last else math.ceil(per_rank / batch_size)
        self.num_samples = per_rank if not self.drop_last else self._batches * batch_size

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (its shuffle and augmentation depend only on seed and epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._batches

    def _order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, on the CPU."""
        n = self.images.shape[0]
        if self.train:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch, "perm"))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        total = self._per_rank * self.world_size
        if total > n:  # pad by wrapping around so every rank has the same count
            order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
        return order[:total][self.rank::self.world_size][: self.num_samples]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches_of(epoch)

    def _batches_of(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(epoch)
        params = None
        if self.train:
            # Draw the whole epoch's crops and flips at once; positions differ across ranks.
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch, "augment"))
            oy, ox, flip = _draw(self._per_rank * self.world_size, self.padding, gen)
            pick = slice(self.rank, None, self.world_size)
            params = [t[pick][: self.num_samples].to(self.device) for t in (oy, ox, flip)]
        order = order.to(self.device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for i in range(self._batches):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]
            x = self.images.index_select(0, idx)
            if params is not None:
                x = _crop_flip(x, params[0][sl], params[1][sl], params[2][sl], self.padding)
            x = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
            x = x.to(dtype=self.dtype, memory_format=memory_format)
            yield x, self.labels.index_select(0, idx)
