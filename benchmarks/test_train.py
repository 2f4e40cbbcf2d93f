"""Training throughput: fastres (fused model + fused optimizer) against PyTorch eager and torch.compile.

Run: ``pytest benchmarks/test_train.py --benchmark-only`` (see conftest.py);
``-k "resnet20 and bf16"`` for a subset. All timed rows need CUDA; a CPU run has
one tiny smoke group (``resnet8``: ResNet-20's stages with one block each, batch 8;
fastres takes its pure-PyTorch path there, so it only checks that the rows run).

Unit of work
------------
One training step at batch 512: the next batch (below), forward, cross-entropy
(label smoothing 0.1, on fp32 logits), ``zero_grad(set_to_none=True)``,
backward, optimizer step. SGD, lr 0.1 (constant: a schedule is not part of the
step's cost), momentum 0.9, Nesterov, weight decay 5e-4: the fast recipe of
``examples/train_cifar.py`` without its one-cycle schedule.

Data (identical for every variant): 4,096 images of ``fastres.data.synthetic_cifar10``
held on the device as uint8 (eight batches), in a fixed shuffled order; per step
what ``fastres.data.GPULoader`` does per training batch: ``index_select`` of the
batch, ``fastres.data.augment`` (pad 4, random crop, horizontal flip; offsets drawn
on the device from a generator seeded the same for every variant), normalisation
to float32 with the set's channel statistics, and the variant's memory format.
(GPULoader's once-per-epoch shuffle on the host is left out: a constant, not per step.)

Models: ``resnet20`` (16/32/64 channels, [3, 3, 3] blocks) and ``resnet18_cifar``
(64/128/256/512, [2, 2, 2, 2]) of ``fastres.reference.nn``, and ``kuangliu_resnet18``
and ``resnet9`` of ``fastres.testing.zoo`` (plain PyTorch; fastres's variant is the
same model through ``fastres.convert``), initialised from one seed; every variant
loads the same state_dict. dtypes: ``bf16`` is
``torch.autocast(bfloat16)`` around forward and loss (fp32 parameters), for every
variant; ``fp32`` is plain float32 (cuDNN's fp32 convs use TF32 by default, and
fastres follows ``torch.backends.cudnn.allow_tf32``; the flags are in extra_info).

Variants (one row each)
-----------------------
* ``fastres``              ``fastres.resnet20()`` / ``fastres.resnet18_cifar()``, model and data
  channels_last, ``fastres.optim.SGD``
* ``eager``                the reference model NCHW-contiguous, ``torch.optim.SGD(foreach=True)``
* ``eager channels_last``  the same, model and data channels_last
* ``torch.compile``        the reference model channels_last, ``torch.compile(model, dynamic=False)``
  (default mode), ``torch.optim.SGD(fused=True)`` (``foreach=True`` where this torch
  has no fused SGD for the device; the row's extra_info says which)
``torch.backends.cudnn.benchmark`` is on for every row. A compile that fails
skips its row with the error. The compiled variant runs on CUDA only.

Reported (extra_info): ``images_per_s`` = batch / step time and ``epoch_s`` =
50,000 / batch steps x step time (one CIFAR-10 epoch of 50,000 images at this
step time; a drop_last epoch has 97 full steps, 0.7% less), besides the harness's
median step time and ratios. No bytes_moved: a training step is not
bandwidth-bound as a whole, so no GB/s.

Goals from the issue, on an H100 (the fastres row of resnet20 bf16 on CUDA; in
extra_info ``goal``/``goal_value``/``goal_met`` and in the summary; not asserted):
* epoch >= 1.5x faster than eager AMP channels_last,
* epoch >= 1.15x faster than torch.compile.
The goal's value is the worst of (speedup / goal); >= 1 meets both.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from resnet_bench import (COMPILE_CPU_SKIP, DTYPES, amp, compiled_step, cudnn_benchmark,  # noqa: F401 (fixture)
                          fastres, precision_info, ref, release_compiled, require_fastres, warm,
                          with_launch_count)

EPOCH_IMAGES = 50_000
POOL_BATCHES = 8  # the device-resident pool holds this many batches
RECIPE = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
LABEL_SMOOTHING = 0.1
MODELS = ("resnet20", "resnet18_cifar", "kuangliu_resnet18", "resnet9")
# Written in plain PyTorch (fastres.testing.zoo), the fastres variant through fastres.convert (issue 20): a
# ResNet-18 with 1x1-conv shortcuts in the most-copied CIFAR style, and ResNet-9 (64-128-256-512).
CONVERTED_MODELS = ("kuangliu_resnet18", "resnet9")
VARIANTS = ["fastres", "eager", "eager channels_last", "torch.compile"]
FASTRES_MODEL = ("fastres", "torch.compile(fastres)")  # variants built from fastres's model and optimizer
CUDA_GRAPH = " + CUDA graph"  # variant suffix: the whole step captured in one CUDA graph (train_step)
GOALS = {"eager channels_last": 1.5, "torch.compile": 1.15}  # speedups, resnet20 bf16

# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module", autouse=True)
def _release_device_memory():
    """After the last row: free the image pool and the compiled models before other benchmark files run."""
    yield
    image_pool.cache_clear()
    release_compiled()


@functools.lru_cache(maxsize=1)
def image_pool(n: int, device: str):
    """``n`` synthetic CIFAR images (uint8) and labels on ``device``, a fixed order, and the normalisation."""
    require_fastres()
    from fastres.data import channel_stats, synthetic_cifar10

    data = synthetic_cifar10(num_train=n, num_test=0, seed=0)
    mean, std = channel_stats(data.train_images)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    c = data.train_images.shape[1]
    std_t, mean_t = torch.tensor(std, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, c, 1, 1).to(device)
    shift = (-mean_t / std_t).to(torch.float32).view(1, c, 1, 1).to(device)
    return data.train_images.to(device), data.train_labels.to(device), order.to(device), scale, shift


class Batches:
    """Each call: the next batch of the pool, augmented and normalised as GPULoader does per batch."""

    def __init__(self, batch: int, device: str, memory_format: torch.memory_format, image_hw: int = 32) -> None:
        self.images, self.labels, self.order, self.scale, self.shift = image_pool(batch * POOL_BATCHES, device)
        self.batch, self.memory_format = batch, memory_format
        self.pool = self.images.shape[-1] // image_hw  # > 1: average-pooled (a smoke model's smaller images)
        self.generator = torch.Generator(device).manual_seed(0)
        self.i = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        from fastres.data import augment

        start = (self.i % POOL_BATCHES) * self.batch
        self.i += 1
        idx = self.order[start:start + self.batch]
        x = augment(self.images.index_select(0, idx), self.generator)
        x = torch.addcmul(self.shift, x.to(torch.float32), self.scale)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        return x.contiguous(memory_format=self.memory_format), self.labels.index_select(0, idx)


# --------------------------------------------------------------------------- models and steps


# CPU smoke models: ``resnet8`` (one block per stage) for the CPU rows; ``tiny`` (one 8-channel block, on the
# batches average-pooled to 4x4) for the lease runner's dry run, where fastres runs under Triton's interpreter.
SMOKE_MODELS = {"resnet8": ((1, 1, 1), (16, 32, 64)), "tiny": ((1,), (8,))}
SMOKE_IMAGE_HW = {"tiny": 4}


def build_model(model: str, fused: bool) -> torch.nn.Module:
    """fastres's model (``fastres.resnet20()``, ...) or the reference one, a CPU smoke model (SMOKE_MODELS), or
    a plain-PyTorch model of ``fastres.testing.zoo.FULL`` (CONVERTED_MODELS), fused by ``fastres.convert``."""
    if model in CONVERTED_MODELS:
        from fastres.testing import zoo

        plain = zoo.FULL[model]()
        return fastres.convert(plain) if fused else plain
    if model in SMOKE_MODELS:  # few ops, so the CPU row stays short on a busy machine
        layers, widths = SMOKE_MODELS[model]
        return (fastres.ResNet(fastres.nn.ResidualBlock, layers, widths=widths) if fused
                else ref.ResNet(ref.ResidualBlock, layers, widths=widths))
    return getattr(fastres, model)() if fused else ref.build(model)


@functools.lru_cache(maxsize=2)
def initial_state(model: str) -> dict:
    """The reference model's He-initialised state_dict (CPU), one seed for every variant."""
    require_fastres()
    torch.manual_seed(0)
    return build_model(model, fused=False).state_dict()


def build_optimizer(variant: str, params: list, device: str):
    """(optimizer, description) of ``variant`` (without a CUDA_GRAPH suffix)."""
    if variant in FASTRES_MODEL:
        return fastres.optim.SGD(params, **RECIPE), "fastres.optim.SGD"
    if variant == "torch.compile":
        try:
            return torch.optim.SGD(params, **RECIPE, fused=True), "torch.optim.SGD(fused=True)"
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return torch.optim.SGD(params, **RECIPE, foreach=True), f"torch.optim.SGD(foreach=True): no fused ({why})"
    return torch.optim.SGD(params, **RECIPE, foreach=True), "torch.optim.SGD(foreach=True)"


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=LABEL_SMOOTHING)


def train_step(variant: str, model_name: str, batch: int, dtype: str, device: str, compile_backend: str = "inductor"):
    """A zero-argument training step of ``variant``; ``step.extra_info`` describes it.

    Besides VARIANTS, the lease runner (lease.py) times ``"torch.compile(fastres)"`` (the fastres model under
    ``torch.compile``) and any variant with the CUDA_GRAPH suffix: the whole step (forward, loss, backward,
    optimizer step) captured once and replayed by ``examples/train_cifar.py``'s ``GraphedStep``, the batch
    copied into its static input each step (that step zeroes grads in place instead of setting them to None).
    """
    require_fastres()
    graphed = variant.endswith(CUDA_GRAPH)
    base = variant.removesuffix(CUDA_GRAPH)
    net = build_model(model_name, base in FASTRES_MODEL)
    net.load_state_dict(initial_state(model_name))
    memory_format = torch.contiguous_format if base == "eager" else torch.channels_last
    net = net.to(device=device, memory_format=memory_format).train()
    optimizer, opt_name = build_optimizer(base, list(net.parameters()), device)
    compiled = base in ("torch.compile", "torch.compile(fastres)")
    model = torch.compile(net, dynamic=False, backend=compile_backend) if compiled else net
    batches = Batches(batch, device, memory_format, SMOKE_IMAGE_HW.get(model_name, 32))

    if graphed:
        from train_cifar import GraphedStep  # examples/ on sys.path (the lease runner puts it there)

        graph = GraphedStep(model, loss_fn, optimizer, lambda: amp(device, dtype))

        def step():
            graph(*batches())
    else:
        def step():
            x, y = batches()
            with amp(device, dtype):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    step.extra_info = {
        "model": model_name, "params": sum(p.numel() for p in net.parameters()), "optimizer": opt_name,
        "memory_format": "contiguous" if base == "eager" else "channels_last",
        "compile_mode": "default" if compiled else None, "cuda_graph": graphed,
    }
    return step, batches


def train_factories(group: str, model: str, batch: int, dtype: str, device: str) -> dict:
    def make(variant: str):
        def factory():
            if variant == "torch.compile":
                if device != "cuda":
                    pytest.skip(COMPILE_CPU_SKIP)
                return compiled_step(group, variant, lambda: warm(train_step(variant, model, batch, dtype, device)[0]))
            step, batches = train_step(variant, model, batch, dtype, device)
            if variant == "fastres":
                info = step.extra_info
                probe = torch.empty(0, device=device)  # the backend a CUDA / CPU float32 tensor takes
                step = with_launch_count(step, probe)
                step.extra_info.update(info)
            return step

        return factory

    return {v: make(v) for v in VARIANTS}


def train_goal(ms: dict):
    if "fastres" not in ms:
        return None
    parts = [(name, ms[name] / ms["fastres"], want) for name, want in GOALS.items() if name in ms]
    if not parts:
        return None
    worst = min(s / want for _, s, want in parts)
    text = "; ".join(f"speedup {s:.2f}x {name} (>= {want})" for name, s, want in parts)
    return f"{text}; worst speedup/goal (>= 1 meets all)", worst, worst >= 1


# --------------------------------------------------------------------------- rows


def train_rows():
    for model in MODELS:
        for dtype in DTYPES:
            yield pytest.param("cuda", model, 512, dtype, id=f"cuda-{model}-b512-{dtype}", marks=pytest.mark.gpu)
    yield pytest.param("cpu", "resnet8", 8, "fp32", id="cpu-resnet8-b8-fp32")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device,model,batch,dtype", list(train_rows()))
def test_train_step(bench, device, model, batch, dtype, variant):
    require_fastres()
    group = f"train/{device}/{model}/b{batch}/{dtype}"
    with_goal = device == "cuda" and model == "resnet20" and dtype == "bf16"
    info = bench.compare(
        group,
        train_factories(group, model, batch, dtype, device),
        variant,
        device=device,
        goal=train_goal if with_goal else None,
        extra={"model": model, "batch": batch, "recipe": dict(RECIPE, label_smoothing=LABEL_SMOOTHING),
               "data": f"synthetic_cifar10, {batch * POOL_BATCHES} images on the device, augment + normalise per step",
               "steps_per_epoch": EPOCH_IMAGES / batch, **precision_info(device, dtype)},
    )
    ms = info.get("median_ms")
    if ms:
        info["images_per_s"] = batch / (ms * 1e-3)
        info["epoch_s"] = EPOCH_IMAGES / batch * ms * 1e-3
