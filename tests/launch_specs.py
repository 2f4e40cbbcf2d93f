"""Ahead-of-time compile specs recorded from real launches of fastres models.

    python tests/launch_specs.py [--json PATH] [--quick]

Runs ResNet-20 and ResNet-18-CIFAR training steps (forward, backward,
``fastres.optim`` SGD with Nesterov momentum and Adam) and eval forwards at
batch 512, 32 x 32, channels_last, fp32 and autocast bf16, plus small
ResNet-20 runs for the variants those do not reach (fp16 autocast with a
GradScaler, BatchNorm momentum=None, no running statistics). Every kernel body
is skipped (``fastres.testing.stub_launches``), so only the launchers run; an
observer (``observe_launches``) sees each launch's kernel, arguments and
constexprs, and turns them into the specialisation Triton's JIT derives from
the same arguments at launch on a GPU (:func:`specialise`). Distinct ones are
written as specs in the format ``tests/aot_compile.py`` documents, keyed by
module and kernel; the AOT check (which must run without TRITON_INTERPRET)
runs this script in a subprocess and compiles them.

The launchers plan for the device they run on, so while recording they are
told the GPU's answers: fp32 convs use TF32 (cuDNN's default), the
interpreter's bf16 ``tl.dot`` workaround is off, and the weight gradient splits
for an H100/H200's 132 SMs.

CPU tensors take the kernel path only under ``TRITON_INTERPRET=1``, which this
script sets itself before importing fastres. Stubbed kernels leave their
outputs uninitialised and large ``torch.empty`` buffers are never touched, so
the batch-512 runs need little memory and a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import nn  # noqa: E402

import fastres  # noqa: E402
from fastres.launchers import conv as conv_launchers  # noqa: E402
from fastres.testing import observe_launches, stub_launches  # noqa: E402

GPU_SMS = 132  # H100 / H200 SXM
BATCH = 512
DEFAULT_NUM_STAGES = 3  # triton's default for CUDA
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ------------------------------------------------------------------ Triton's specialisation

def specialise(arg: Any, specialize: bool = True, align: bool = True) -> tuple[str, Any]:
    """(type, value or divisibility key) of one non-constexpr argument, as Triton's JIT derives it.

    The rules of ``specialize_impl`` in triton/runtime/jit.py, unchanged from
    3.3 through 3.9 (3.6 on the GPU machine; 3.9 here, where it is native code
    with the same behaviour): None and the integer 1 become constexprs; other
    integers are i32 (i64/u64 outside its range) and marked divisible by 16
    ("D") when they are; floats are fp32 and bools u1, never specialised;
    tensors are pointers to their dtype, "D" when the address is a multiple of
    16. ``specialize``/``align`` are False for parameters listed in
    ``do_not_specialize``/``do_not_specialize_on_alignment``.
    """
    if arg is None:
        return "constexpr", None
    if isinstance(arg, bool):
        return "u1", None
    if isinstance(arg, int):
        key = ("D" if align and arg % 16 == 0 else "") if specialize else None
        if arg == 1 and specialize:
            return "constexpr", 1
        if -(2**31) <= arg <= 2**31 - 1:
            return "i32", key
        if 2**63 <= arg <= 2**64 - 1:
            return "u64", key
        return "i64", key
    if isinstance(arg, float):
        return "fp32", None
    if hasattr(arg, "data_ptr"):
        key = ("D" if align and arg.data_ptr() % 16 == 0 else "") if specialize else None
        return "*" + _dtype_name(arg.dtype), key
    raise TypeError(f"cannot specialise a launch argument of type {type(arg).__name__}: {arg!r}")


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                torch.bool: "i1"}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"no Triton pointer type for {dtype}")
    return _DTYPE_NAMES[dtype]


class _Param(NamedTuple):
    name: str
    is_constexpr: bool
    has_default: bool
    default: Any
    specialize: bool  # not in do_not_specialize
    align: bool  # not in do_not_specialize_on_alignment


def _kernel_params(kernel: Any) -> tuple[Any, list[_Param]]:
    """The Python function of a launched kernel (under autotune/heuristics wrappers) and its parameters,
    as Triton's JIT sees them. Under the interpreter kernels are ``InterpretedFunction`` objects, which keep
    the decorator's arguments in ``kwargs`` rather than building ``params``."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    options = getattr(kernel, "kwargs", None) or {}
    no_spec = list(getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize") or [])
    no_align = list(getattr(kernel, "do_not_specialize_on_alignment", None)
                    or options.get("do_not_specialize_on_alignment") or [])
    params = []
    for i, p in enumerate(inspect.signature(kernel.fn).parameters.values()):
        annotation = p.annotation
        is_constexpr = annotation is tl.constexpr or "constexpr" in str(annotation)
        params.append(_Param(p.name, is_constexpr, p.default is not inspect.Parameter.empty, p.default,
                             i not in no_spec and p.name not in no_spec, i not in no_align and p.name not in no_align))
    return kernel.fn, params


def spec_of_launch(kernel: Any, args: tuple, meta: dict) -> tuple[str, str, dict[str, Any]]:
    """(module, kernel name, spec) of one launch ``kernel[grid](*args, **meta)``."""
    fn, params = _kernel_params(kernel)
    names = [p.name for p in params]
    values = dict(zip(names, args))
    unknown = [k for k in meta if k not in names and k not in LAUNCH_OPTIONS]
    if unknown:
        raise ValueError(f"{fn.__name__}: launch keyword(s) {unknown} are neither arguments nor options")
    values.update({k: v for k, v in meta.items() if k in names})
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    divisible: list[str] = []
    for p in params:
        if p.is_constexpr:
            if p.name in values:
                constexprs[p.name] = values[p.name]
            elif p.has_default:
                constexprs[p.name] = p.default
            else:
                raise ValueError(f"{fn.__name__}: constexpr {p.name} not given at launch")
            continue
        if p.name not in values:
            raise ValueError(f"{fn.__name__}: argument {p.name} not given at launch")
        ty, key = specialise(values[p.name], p.specialize, p.align)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = key
        elif key == "D":
            divisible.append(p.name)
    spec = {"signature": signature, "constexprs": constexprs,
            "num_warps": meta.get("num_warps", 4), "num_stages": meta.get("num_stages", DEFAULT_NUM_STAGES),
            "divisible_by_16": divisible}
    if meta.get("maxnreg") is not None:
        spec["maxnreg"] = meta["maxnreg"]
    return fn.__module__, fn.__name__, spec


# ------------------------------------------------------------------ labels

_PRO = {0: "", 1: "bnrelu>", 2: "bngrad>"}
_EPI = {0: "", 1: ">stats", 2: ">relugrad"}
_RES = {0: "", 1: "+res", 2: "+res(bn)", 3: "+res after relu"}


def _act(spec: dict[str, Any], arg: str) -> str:
    return spec["signature"][arg].lstrip("*")


def describe(name: str, spec: dict[str, Any]) -> str:
    """A short name of a spec's variant for the report, e.g. ``dgrad s2 bngrad>+res bf16 64x16x16``."""
    c = spec["constexprs"]
    if name == "_conv_kernel":
        kind = "dgrad" if c["TRANSPOSED"] else ("eval" if c["HAS_AFFINE"] else "fwd")
        flags = "".join([{0: "", 1: " pair-out", 2: " pair-in"}[c.get("PAIR", 0)],
                         "+res" if c["HAS_RESIDUAL"] else "", "+relu" if c["RELU"] else "",
                         "" if c["EPILOGUE"] != 1 or c["TRACK"] else " norun",
                         " cumul" if c["EPILOGUE"] == 1 and c["CUMULATIVE"] else ""])
        dot = " tf32" if c["DOT_PRECISION"] == "tf32" else ""
        return (f"{kind} s{c['STRIDE']} {_PRO[c['PROLOGUE']]}conv{_EPI[c['EPILOGUE']]}{flags} {_act(spec, 'a_ptr')}"
                f"{dot} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}")
    if name == "_conv_wgrad_kernel":
        dot = " tf32" if c["DOT_PRECISION"] == "tf32" else ""
        split = "" if "ROWS_PER_SPLIT" not in c else " 1split"
        return (f"wgrad s{c['STRIDE']} dy:{_PRO[c['DY_PROLOGUE']] or '-'} x:{_PRO[c['X_PROLOGUE']] or '-'} "
                f"{_act(spec, 'x_ptr')}{dot} {c['BLOCK_K']}x{c['BLOCK_C']}{split}")
    if name == "_conv_grads_kernel":
        dot = " tf32" if c["DOT_PRECISION"] == "tf32" else ""
        epi = _EPI[c["EPILOGUE"]] + ("+res" if c["HAS_RESIDUAL"] else "")
        return (f"grads s1 bngrad>conv{epi} x:{_PRO[c['X_PROLOGUE']] or '-'} {_act(spec, 'x_ptr')}{dot} "
                f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_KW']}")
    if name == "_bn_stats_kernel":
        track = " track" + (" cumulative" if c["CUMULATIVE"] else "") if c["TRACK"] else ""
        return f"bn stats {_act(spec, 'x_ptr')} {c['BLOCK_M']}x{c['BLOCK_C']}{track}"
    if name == "_bn_grad_apply_kernel":
        res = "+res" if c["HAS_RESIDUAL"] else ""
        return f"bn grad apply{res} {_act(spec, 'y_ptr')} {c['BLOCK_M']}x{c['BLOCK_C']}"
    if name in ("_bn_relu_apply_kernel", "_bn_relu_backward_kernel"):
        kind = "apply" if name == "_bn_relu_apply_kernel" else "backward"
        pool = ("+maxpool" if c.get("POOL") else "") + ("" if c.get("RELU", True) else " no-relu")
        return f"tail {kind}{_RES[c['RESIDUAL']]}{pool} {_act(spec, 'y_ptr')} {c['BLOCK_M']}x{c['BLOCK_C']}"
    dtype = next((_act(spec, a) for a in ("param_ref_ptr",) if a in spec["signature"]), "")
    flags = [k.lower() for k, v in c.items() if v is True and k != "ALIGNED"]
    return " ".join([dtype, *flags]).strip() or "-"


# ------------------------------------------------------------------ recording

# Integer arguments that are spatial extents or row counts: they bound and decode the rows (pixels) of a
# tile, never the channels along which loads are vectorised, so whether they divide by 16 does not change
# the code that matters; specs differing only there are one variant.
ROW_EXTENTS = frozenset({"HA", "WA", "HO", "WO", "M", "H", "W", "P", "Q", "N", "ROWS_PER_SPLIT"})


def variant_key(spec: dict[str, Any], unused: list[str]) -> str:
    """What a spec compiles to, up to the divisibility of row extents and the types of the pointers
    its variant never reads (the launchers' placeholders)."""
    signature = {n: ("unused" if n in unused else t) for n, t in spec["signature"].items()}
    divisible = sorted(set(spec["divisible_by_16"]) - ROW_EXTENTS - set(unused))
    return json.dumps([signature, spec["constexprs"], divisible, spec["num_warps"], spec["num_stages"],
                       spec.get("maxnreg")],
                      sort_keys=True, default=str)


# Constexprs that only size a finalize loop, or never vary: left out of the pairs a covering set must hold.
_UNPAIRED = frozenset({"BLOCK_T", "UPCAST_DOT", "R", "S", "PAD", "IDX64"})
_ACTIVATIONS = ("a_ptr", "x_ptr", "y_ptr", "param_ref_ptr")


def _features(spec: dict[str, Any], unused: list[str]) -> set[tuple]:
    """What a covering set must include at least once: each argument's type, constant value and
    divisibility, and each pair of constexpr values (with the activation dtype as one more value), so
    that e.g. every epilogue meets every block size and every dtype somewhere."""
    out: set[tuple] = {("warps", spec["num_warps"])}
    for n, t in spec["signature"].items():
        if n in unused:
            continue
        if t == "constexpr":
            out.add(("value", n, json.dumps(spec["constexprs"][n])))
        else:
            out.add(("type", n, t))
            if not t.startswith("*") and n not in ROW_EXTENTS:
                out.add(("divisible", n, n in spec["divisible_by_16"]))
    out |= {("value", n, json.dumps(v, default=str)) for n, v in spec["constexprs"].items()}
    values = sorted((n, json.dumps(v, default=str)) for n, v in spec["constexprs"].items()
                    if spec["signature"].get(n) != "constexpr" and n not in _UNPAIRED)
    values += [(n, spec["signature"][n]) for n in _ACTIVATIONS if n in spec["signature"]]
    out |= {("pair", a, b) for i, a in enumerate(values) for b in values[i + 1:]}
    return out


def covering(entries: list[dict[str, Any]]) -> set[int]:
    """Indices of a small set of entries (greedy set cover) in which every argument type, every
    constant and constexpr value and every divisibility that any entry has appears at least once."""
    features = [_features(e, e["unused"]) for e in entries]
    todo = set().union(*features) if features else set()
    chosen: set[int] = set()
    while todo:
        best = max(range(len(entries)), key=lambda i: (len(features[i] & todo), -i))
        chosen.add(best)
        todo -= features[best]
    return chosen


class Recorder:
    """Distinct specs per (module, kernel), in first-launch order, with the runs that reached each."""

    def __init__(self) -> None:
        self.specs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.run = ""
        self.launches = 0

    def __call__(self, kernel: Any, grid: tuple, args: tuple, meta: dict) -> None:
        module, name, spec = spec_of_launch(kernel, args, meta)
        placeholders = {id(t) for t in conv_launchers._placeholders.values()}
        names = [n for n in spec["signature"]]
        fn_args = dict(zip(_arg_names(kernel), args))
        unused = [n for n in names if id(fn_args.get(n)) in placeholders]
        key = json.dumps(spec, sort_keys=True, default=str)
        seen = self.specs.setdefault((module, name), {})
        if key not in seen:
            seen[key] = {**spec, "runs": [], "unused": unused}
        entry = seen[key]
        entry["unused"] = [n for n in entry["unused"] if n in unused]  # a placeholder in every launch of it
        if self.run not in entry["runs"]:
            entry["runs"].append(self.run)
        self.launches += 1

    def result(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Per module and kernel, the distinct specs, each labelled, with ``runs`` (that launched it),
        ``unused`` (placeholder pointers), ``variant`` (index of its first spec of the same variant_key)
        and ``cover`` (in the covering set)."""
        out: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for (module, name), specs in self.specs.items():
            entries = [dict(spec) for spec in specs.values()]
            counts: dict[str, int] = {}
            for e in entries:
                e["label"] = describe(name, e)
                counts[e["label"]] = counts.get(e["label"], 0) + 1
            index: dict[str, int] = {}
            variants: dict[str, int] = {}
            for i, e in enumerate(entries):
                if counts[e["label"]] > 1:  # same variant, different divisibility or constants: number them
                    index[e["label"]] = index.get(e["label"], 0) + 1
                    e["label"] = f"{e['label']} #{index[e['label']]}"
                e["variant"] = variants.setdefault(variant_key(e, e["unused"]), i)
            cover = covering([e for e in entries])
            for i, e in enumerate(entries):
                e["cover"] = i in cover
            out.setdefault(module, {})[name] = entries
        return out


def _arg_names(kernel: Any) -> list[str]:
    return [p.name for p in _kernel_params(kernel)[1]]


@contextlib.contextmanager
def planned_as_on_gpu(sms: int = GPU_SMS) -> Iterator[None]:
    """Make the conv launchers plan as they would on a CUDA device (TF32 for fp32 convs, no
    interpreter workaround, ``sms`` SMs), clearing their plan caches before and after."""
    patches = {
        "dot_precision": lambda dtype, device: "tf32" if dtype == torch.float32 and conv_launchers.cudnn_conv_tf32()
        else "ieee",
        "_upcast_dot": lambda dtype, device_type: False,
        "_num_sms": lambda device: sms,
    }
    with conv_launchers.planned_with(**patches):
        yield


def _model(name: str, bn: Callable[[nn.BatchNorm2d], None] | None = None) -> nn.Module:
    model = getattr(fastres, name)().to(memory_format=torch.channels_last)
    if bn is not None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                bn(module)
    return model


def _no_running_stats(bn: nn.BatchNorm2d) -> None:
    bn.track_running_stats = False
    bn.running_mean = bn.running_var = bn.num_batches_tracked = None


def _cumulative(bn: nn.BatchNorm2d) -> None:
    bn.momentum = None


def train_step(model: nn.Module, optimizer: str, amp: torch.dtype | None, batch: int) -> None:
    """One forward, backward and optimizer step (twice for the optimizer: its first step differs)."""
    if optimizer == "sgd":  # the example's recipe
        opt = fastres.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = fastres.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu") if amp == torch.float16 else None
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    model.train()
    for _ in range(2):
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            # Stubbed kernels leave garbage in their outputs: keep the loss finite.
            loss = nn.functional.cross_entropy(torch.nan_to_num(model(x)).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def eval_forward(model: nn.Module, amp: torch.dtype | None, batch: int) -> None:
    model.eval()
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        model(x)


def runs(quick: bool = False) -> list[tuple[str, Callable[[], None]]]:
    """The recorded runs: (name, function). ``quick``: ResNet-20 bf16 training only."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    out: list[tuple[str, Callable[[], None]]] = []
    for model in ("resnet20",) if quick else ("resnet20", "resnet18_cifar"):
        for dname, amp in dtypes.items():
            if quick and dname == "fp32":
                continue
            for opt in ("sgd",) if quick else ("sgd", "adam"):
                out.append((f"{model} {dname} train {opt}",
                            lambda m=model, o=opt, a=amp: train_step(_model(m), o, a, BATCH)))
            if not quick:
                out.append((f"{model} {dname} eval", lambda m=model, a=amp: eval_forward(_model(m), a, BATCH)))
    if not quick:
        out += [
            ("resnet20 fp16 train sgd + GradScaler",
             lambda: train_step(_model("resnet20"), "sgd", torch.float16, BATCH)),
            ("resnet20 fp32 train sgd, BN momentum=None",
             lambda: train_step(_model("resnet20", _cumulative), "sgd", None, BATCH)),
            ("resnet20 fp32 train sgd, BN without running stats",
             lambda: train_step(_model("resnet20", _no_running_stats), "sgd", None, BATCH)),
            ("resnet20 fp32 eval, BN without running stats",
             lambda: eval_forward(_model("resnet20", _no_running_stats), None, BATCH)),
        ]
        # ResNets written in plain PyTorch, through fastres.convert (issue 20): 1x1 and strided projections,
        # tensor residuals, 1x1 convs in a chain, conv-BN-ReLU chains with their max-pools, residuals after the
        # ReLU, pre-activation blocks' conv -> BN -> ReLU -> conv + residual.
        for name, dname in (("kuangliu_resnet18", "fp32"), ("kuangliu_resnet18", "bf16"),
                            ("torchvision_style", "bf16"), ("option_a_resnet20", "bf16"), ("resnet9", "fp32"),
                            ("resnet9", "bf16"), ("preact_resnet18", "fp32"), ("preact_resnet18", "bf16"),
                            ("bottleneck", "bf16")):
            out.append((f"zoo {name} {dname} train sgd",
                        lambda n=name, a=dtypes[dname]: train_step(_zoo(n), "sgd", a, BATCH)))
        for dname in ("fp32", "bf16"):  # a conv -> BN with no ReLU after it (the tail kernels without RELU)
            out.append((f"conv-BN {dname} train sgd",
                        lambda a=dtypes[dname]: train_step(_conv_bn_model(), "sgd", a, BATCH)))
        out.append(("zoo kuangliu_resnet18 bf16 eval",
                    lambda: eval_forward(_zoo("kuangliu_resnet18"), torch.bfloat16, BATCH)))
    return out


def _conv_bn_model() -> nn.Module:
    """conv -> BN (no ReLU), pooled into a classifier, converted: ``conv_bn_relu`` with ``relu=False``."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 10))
    return fastres.convert(model.to(memory_format=torch.channels_last))


def _zoo(name: str) -> nn.Module:
    """A model of fastres.testing.zoo at its full widths (the bottleneck net at its own), converted."""
    from fastres.testing import zoo

    make = zoo.FULL.get(name) or {"torchvision_style": zoo.TorchvisionStyleResNet,
                                  "bottleneck": zoo.BottleneckResNet}[name]
    return fastres.convert(make().to(memory_format=torch.channels_last))


def record(quick: bool = False) -> dict[str, Any]:
    """Run every recorded run with stubbed launches; the specs by module and kernel, and the runs."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # uninitialised outputs would make the few real aten ops crawl
    recorder = Recorder()
    names = []
    with planned_as_on_gpu(), stub_launches(), observe_launches(recorder):
        for name, run in runs(quick):
            recorder.run = name
            names.append(name)
            run()
    return {"batch": BATCH, "gpu_sms": GPU_SMS, "runs": names, "launches": recorder.launches,
            "specs": recorder.result()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, metavar="PATH", help="write the specs here (default: stdout)")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 bf16 SGD training only")
    args = parser.parse_args(argv)
    result = record(args.quick)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
        entries = [e for kernels in result["specs"].values() for v in kernels.values() for e in v]
        variants = {(id(v), e["variant"]) for kernels in result["specs"].values() for v in kernels.values() for e in v}
        print(f"{len(entries)} distinct specs ({len(variants)} variants, {sum(e['cover'] for e in entries)} in the "
              f"covering set) from {result['launches']} launches in {len(result['runs'])} runs -> {args.json}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
