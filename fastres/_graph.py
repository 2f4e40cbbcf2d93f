"""``fastres.convert`` for networks written in plain PyTorch: fusion by patterns on the ``torch.fx`` graph.

The model is traced symbolically (``torch.fx``), so what is matched is what the code computes, however it
is written: ReLU as an ``nn.ReLU`` module (one module used twice, ``inplace=True``), ``F.relu``,
``torch.relu`` or ``.relu()``; a residual as ``out += s``, ``out = out + s`` or ``torch.add``. The
patterns, matched in this order (a node is taken by the first that takes it):

* **the basic residual block**: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)``, the shortcut being
  ``x`` itself, ``bnd(convd(x))`` (any kernel size and stride the kernels take) or ``bnd(convd(b))`` of
  another tensor (a bottleneck's block input, whose 1x1 chain gives ``x``), or any other tensor (the
  option-A strided slice, a conv without BN, ...), which the fused join takes as a plain tensor; or
  ``relu(bn2(conv2(...))) + shortcut``, the residual added after the ReLU (ResNet-9):
  ``fastres.ops.residual_block``;
* **a pre-activation block**: ``a = relu(bn0(x))``, ``conv2(relu(bn1(conv1(a)))) + shortcut``, the shortcut
  ``x`` or a conv without BN of ``a``: ``fastres.ops.preact_block``;
* **conv -> BN -> ReLU -> conv** (a conv with no BN after it) ``[+ shortcut]`` elsewhere:
  ``fastres.ops.conv_bn_relu_conv``;
* **conv -> BN -> ReLU** (each result used only by the next), with the 2x2 stride-2 max-pool that may
  follow it: ``fastres.functional.conv_bn_relu`` (the pool fused into its BN-ReLU pass in training mode);
  or conv -> BN with no ReLU after it (the same op with ``relu=False``);
* **BN -> ReLU** of a tensor no chain produced (a pre-activation net's head, a network input):
  ``fastres.ops.bn_relu``.

Matched nodes are replaced by one call each; the modules stay where they were (the graph reads them by
their paths on every call, so a module replaced later, e.g. by ``nn.SyncBatchNorm.convert_sync_batchnorm``,
is the one used), and the converted model has the same parameters, buffers and ``state_dict`` keys, in
the same order. Everything else stays as traced. Each conv and BatchNorm gets a line in the report: which
fused op took it, or why none did.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclasses.dataclass
class Row:
    """One line of the report: a conv or BatchNorm, the fused op that took it, or why none did."""

    path: str
    kind: str  # "Conv2d", "BatchNorm2d", ...
    op: Optional[str]  # "conv_bn_relu", "residual_block", or None
    why: str = ""

    def __str__(self) -> str:
        return f"  {self.path:<40} {self.kind:<14} " + (f"-> {self.op}" if self.op else f"not fused: {self.why}")


@dataclasses.dataclass
class Unit:
    """A matched conv -> BN (-> ReLU (-> 2x2 max-pool)) chain: its nodes (None where it has none)."""

    conv: fx.Node
    bn: fx.Node
    relu: Optional[fx.Node]
    pool: Optional[fx.Node] = None

    @property
    def input(self) -> fx.Node:
        return self.conv.args[0]

    @property
    def output(self) -> fx.Node:
        return self.relu if self.relu is not None else self.bn


@dataclasses.dataclass
class Block:
    """A matched basic residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)``, or with the
    residual added after the second ReLU (``after_relu``: ``relu(bn2(...)) + shortcut``, ResNet-9's)."""

    first: Unit  # conv1 -> bn1 -> relu
    second: Unit  # conv2 -> bn2 (-> relu when after_relu)
    add: fx.Node
    relu: Optional[fx.Node]  # after the add; None when the residual is added after the second ReLU
    projection: Optional[Unit]  # convd -> bnd: the shortcut, a projection of x or of another tensor

    @property
    def after_relu(self) -> bool:
        return self.relu is None

    @property
    def last(self) -> fx.Node:
        """The node whose value is the block's output."""
        return self.add if self.relu is None else self.relu

    @property
    def input(self) -> fx.Node:
        return self.first.input

    @property
    def down_input(self) -> Optional[fx.Node]:
        """What the projection reads when that is not the block's input (a bottleneck's block input)."""
        p = self.projection
        return p.input if p is not None and p.input is not self.first.input else None

    @property
    def shortcut(self) -> Any:
        """The add's other operand (read from the graph: rewriting an earlier block replaces nodes)."""
        a, b = self.add.args[:2]
        return b if a is self.second.output else a


@dataclasses.dataclass
class ChainConv:
    """A conv -> BN -> ReLU chain whose only user is a conv without BN, and the add that may take that conv's
    output: ``conv2(relu(bn(conv(x)))) [+ shortcut]`` (a pre-activation block's conv1 to its residual sum)."""

    unit: Unit
    conv2: fx.Node
    add: Optional[fx.Node]

    @property
    def last(self) -> fx.Node:
        return self.conv2 if self.add is None else self.add

    @property
    def shortcut(self) -> Optional[fx.Node]:
        if self.add is None:
            return None
        a, b = self.add.args[:2]
        return b if a is self.conv2 else a


@dataclasses.dataclass
class PreactBlock:
    """A pre-activation block: ``a = relu0(bn0(x))`` read by a :class:`ChainConv`'s first conv (and by a
    projection conv without BN whose output is the chain-conv's shortcut; else the shortcut is ``x``)."""

    bn0: fx.Node
    relu0: fx.Node
    chain: ChainConv
    down: Optional[fx.Node]

    @property
    def input(self) -> fx.Node:
        return self.bn0.args[0]


class Tracer(fx.Tracer):
    """Traces into user modules; fastres's fused modules stay leaves (they are fused already)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .nn import ConvBNReLU, ResidualBlock

        if isinstance(m, (ResidualBlock, ConvBNReLU)):
            return True
        # A module with hooks runs as a whole, so that they fire (traced through, they would not).
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        return super().is_leaf_module(m, qualname)


def _module(node: Any, modules: dict, *classes: type) -> Optional[nn.Module]:
    """The module a ``call_module`` node calls, if it is exactly one of ``classes``."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = modules.get(node.target)
        if type(m) in classes:
            return m
    return None


def _is_relu(node: fx.Node, modules: dict) -> bool:
    """A ReLU written any of the usual ways, applied to the node's first argument alone."""
    if node.op == "call_module":
        return _module(node, modules, nn.ReLU) is not None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return len(node.args) == 1 and not node.kwargs
    return False


def _is_add(node: fx.Node) -> bool:
    """``a + b``, ``a += b``, ``torch.add(a, b)`` or ``a.add(b)``/``a.add_(b)`` without ``alpha``."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs
    if node.op == "call_method" and node.target in _ADD_METHODS:
        return len(node.args) == 2 and not node.kwargs
    return False


def _is_max_pool_2x2(node: Optional[fx.Node], modules: dict) -> bool:
    """A 2x2 stride-2 max-pool (no padding, dilation, ceil mode or indices): ``nn.MaxPool2d(2)`` or
    ``F.max_pool2d(x, 2)`` however its arguments are spelled."""
    if node is None:
        return False
    if node.op == "call_module":
        m = _module(node, modules, nn.MaxPool2d)
        if m is None or len(node.args) != 1 or node.kwargs:
            return False
        options = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                       ceil_mode=m.ceil_mode, return_indices=m.return_indices)
    elif node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d):
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        if len(node.args) > len(names) or not set(node.kwargs) <= set(names[1:]):
            return False
        options = dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
        options.update(zip(names[1:], node.args[1:]))
        options.update(node.kwargs)
        if "kernel_size" not in options:
            return False
    else:
        return False
    kernel = options["kernel_size"]
    stride = options["stride"]
    return (kernel in (2, (2, 2), [2, 2]) and stride in (None, (), [], 2, (2, 2), [2, 2])
            and options["padding"] in (0, (0, 0), [0, 0]) and options["dilation"] in (1, (1, 1), [1, 1])
            and options["ceil_mode"] is False and options["return_indices"] is False)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _units(graph: fx.Graph, modules: dict) -> dict[fx.Node, Unit]:
    """Every conv -> BN (-> ReLU) chain, by its conv node: the conv's only user is the BN, and the BN's only
    user, if a ReLU, joins the chain."""
    units = {}
    for node in graph.nodes:
        if _module(node, modules, nn.Conv2d) is None or len(node.args) != 1 or node.kwargs:
            continue
        bn = _only_user(node)
        if bn is None or _module(bn, modules, nn.BatchNorm2d, nn.SyncBatchNorm) is None or bn.args[0] is not node:
            continue
        relu = _only_user(bn)
        if relu is None or not _is_relu(relu, modules):
            units[node] = Unit(node, bn, None)
            continue
        pool = _only_user(relu)
        units[node] = Unit(node, bn, relu, pool if _is_max_pool_2x2(pool, modules) else None)
    return units


def _blocks(units: dict[fx.Node, Unit], modules: dict) -> list[Block]:
    """Basic blocks: a ReLU'd unit feeding only a second unit whose output's only user is an add: a unit
    without ReLU whose add's only user is a ReLU, or a ReLU'd one (the residual added after the ReLU)."""
    by_output = {u.output: u for u in units.values()}
    blocks = []
    for second in units.values():
        first = by_output.get(second.input)
        if first is None or first.relu is None or _only_user(first.relu) is not second.conv:
            continue
        tail = second.output
        add = _only_user(tail)
        if add is None or not _is_add(add) or tail not in add.args[:2]:
            continue
        relu = None
        if second.relu is None:
            relu = _only_user(add)
            if relu is None or not _is_relu(relu, modules):
                continue
        shortcut = add.args[1] if add.args[0] is tail else add.args[0]
        if not isinstance(shortcut, fx.Node) or shortcut is tail:
            continue
        if add.op == "call_method" and add.target == "add_" or add.target is operator.iadd:
            if add.args[0] is not tail:  # `shortcut += out` would write into the shortcut
                continue
        projection = by_output.get(shortcut) if relu is not None else None
        # A projection of the block's input (x, or a bottleneck's input before its first 1x1 chain)
        if projection is not None and (projection.relu is not None or _only_user(projection.bn) is not add
                                       or projection.conv is first.conv or projection.conv is second.conv):
            projection = None
        if any(add is b.add for b in blocks):  # a join is one block's (weird graphs could offer two)
            continue
        blocks.append(Block(first, second, add, relu, projection))
    return blocks


def _chain_convs(units: dict[fx.Node, Unit], modules: dict, consumed: set) -> list[ChainConv]:
    """Chains (with ReLU, no pool, not in a block) whose ReLU's only user is a conv that no BatchNorm
    follows, with the add of another tensor to that conv's output when that add is its only user."""
    found = []
    for unit in units.values():
        if unit.relu is None or unit.pool is not None or unit.conv in consumed:
            continue
        conv2 = _only_user(unit.relu)
        if (_module(conv2, modules, nn.Conv2d) is None or conv2 in units or len(conv2.args) != 1 or conv2.kwargs
                or conv2.args[0] is not unit.relu):
            continue
        add = _only_user(conv2)
        if add is not None and _is_add(add) and conv2 in add.args[:2]:
            other = add.args[1] if add.args[0] is conv2 else add.args[0]
            in_place = add.op == "call_method" and add.target == "add_" or add.target is operator.iadd
            if not isinstance(other, fx.Node) or other is conv2 or (in_place and add.args[0] is not conv2):
                add = None
        else:
            add = None
        found.append(ChainConv(unit, conv2, add))
    return found


def _preact_blocks(chains: list[ChainConv], unit_bns: set, modules: dict) -> list[PreactBlock]:
    """Chain-convs with a shortcut whose input is ``relu0(bn0(x))`` (a BatchNorm no conv chain takes), read
    only by the chain's conv and a projection conv giving the shortcut, or by the conv alone with ``x`` the
    shortcut. ``unit_bns``: the BatchNorms that follow a conv (a chain's)."""
    found = []
    for chain in chains:
        relu0 = chain.unit.input
        if chain.add is None or not isinstance(relu0, fx.Node) or not _is_relu(relu0, modules):
            continue
        bn0 = relu0.args[0]
        if (_module(bn0, modules, nn.BatchNorm2d, nn.SyncBatchNorm) is None or bn0 in unit_bns
                or len(bn0.args) != 1 or bn0.kwargs or _only_user(bn0) is not relu0
                or not isinstance(bn0.args[0], fx.Node)):
            continue
        others = [user for user in relu0.users if user is not chain.unit.conv]
        down = None
        if not others:
            if chain.shortcut is not bn0.args[0]:
                continue
        elif len(others) == 1:
            down = others[0]
            if (chain.shortcut is not down or _module(down, modules, nn.Conv2d) is None or len(down.args) != 1
                    or down.kwargs or _only_user(down) is not chain.add):
                continue
        else:
            continue
        found.append(PreactBlock(bn0, relu0, chain, down))
    return found


# ------------------------------------------------------------------ the fused calls a converted graph makes


class FusedSite(nn.Module):
    """What one fused call of a converted graph stands for: its name in the model, which a FusionWarning
    gives when the call runs PyTorch's ops (``fastres.functional`` keeps the warned reason in ``__dict__``).
    A module without parameters or buffers (the graph reaches it by its path, ``_fastres_sites.<i>``), so
    the ``state_dict`` is the model's."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._fastres_name = name

    def extra_repr(self) -> str:
        return repr(self._fastres_name)


class ConvBNReLUChain(FusedSite):
    """A conv -> BatchNorm -> ReLU chain of a converted model."""


class ConvBNReLUConv(FusedSite):
    """A conv -> BatchNorm -> ReLU -> conv (+ residual) of a converted model (pre-activation blocks)."""


class BNReLU(FusedSite):
    """A BatchNorm -> ReLU of a converted model whose input no conv chain produced."""


class PreactJoin(FusedSite):
    """A pre-activation block of a converted model: ``a = relu(bn0(x))``, ``conv2(relu(bn1(conv1(a)))) +
    shortcut``."""


class ResidualJoin(FusedSite):
    """A residual block of a converted model: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)``."""

    def __init__(self, name: str, names: tuple) -> None:
        super().__init__(name)
        self.names = names  # the children's paths, for the reasons a FusionWarning gives


def _relu_or_default(relu: Optional[nn.Module]) -> nn.Module:
    from .functional import _RELU

    return _RELU if relu is None else relu


def conv_bn_relu_chain(x: torch.Tensor, conv: nn.Module, bn: nn.Module, relu: Optional[nn.Module],
                       site: ConvBNReLUChain, pool: Any = None) -> torch.Tensor:
    """``relu(bn(conv(x)))`` of a converted graph (``relu`` None: the user wrote a functional ReLU), then a
    2x2 stride-2 max-pool when ``pool`` is given: the user's ``nn.MaxPool2d``, or True for ``F.max_pool2d``."""
    from .functional import _conv_bn_relu

    act = _relu_or_default(relu)
    if pool is None:
        return _conv_bn_relu(x, conv, bn, act, site, lambda: act(bn(conv(x))))
    pool_fn = pool if isinstance(pool, nn.Module) else _max_pool_2x2
    return _conv_bn_relu(x, conv, bn, act, site, lambda: pool_fn(act(bn(conv(x)))), pool_fn)


def conv_bn_chain(x: torch.Tensor, conv: nn.Module, bn: nn.Module, site: ConvBNReLUChain) -> torch.Tensor:
    """``bn(conv(x))`` of a converted graph: a conv -> BN with no ReLU after it, outside a residual join."""
    from .functional import _conv_bn_relu

    return _conv_bn_relu(x, conv, bn, None, site, lambda: bn(conv(x)))


def _max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def conv_bn_relu_conv_chain(x: torch.Tensor, conv: nn.Module, bn: nn.Module, relu: Optional[nn.Module],
                            conv2: nn.Module, shortcut: Optional[torch.Tensor], site: ConvBNReLUConv) -> torch.Tensor:
    """``conv2(relu(bn(conv(x)))) [+ shortcut]`` of a converted graph."""
    from .functional import _conv_bn_relu_conv

    act = _relu_or_default(relu)

    def plain() -> torch.Tensor:
        out = conv2(act(bn(conv(x))))
        return out if shortcut is None else out + shortcut

    return _conv_bn_relu_conv(x, conv, bn, act, conv2, shortcut, site, plain)


def bn_relu_chain(x: torch.Tensor, bn: nn.Module, relu: Optional[nn.Module], site: BNReLU) -> torch.Tensor:
    """``relu(bn(x))`` of a converted graph, ``x`` not a conv's output that a chain took."""
    from .functional import _bn_relu

    act = _relu_or_default(relu)
    return _bn_relu(x, bn, act, site, lambda: act(bn(x)))


def preact_join(x: torch.Tensor, bn0: nn.Module, relu0: Optional[nn.Module], conv1: nn.Module, bn1: nn.Module,
                relu1: Optional[nn.Module], conv2: nn.Module, down: Optional[nn.Module], site: PreactJoin
                ) -> torch.Tensor:
    """A pre-activation block of a converted graph: ``a = relu0(bn0(x))``, ``conv2(relu1(bn1(conv1(a)))) +
    (down(a) if down else x)``."""
    from .functional import _preact_block

    act0, act1 = _relu_or_default(relu0), _relu_or_default(relu1)

    def plain() -> torch.Tensor:
        a = act0(bn0(x))
        return conv2(act1(bn1(conv1(a)))) + (x if down is None else down(a))

    return _preact_block(x, bn0, act0, conv1, bn1, act1, conv2, down, site, plain)


def residual_join(x: torch.Tensor, conv1: nn.Module, bn1: nn.Module, relu1: Optional[nn.Module], conv2: nn.Module,
                  bn2: nn.Module, relu2: Optional[nn.Module], shortcut: torch.Tensor, down_conv: Optional[nn.Module],
                  down_bn: Optional[nn.Module], identity: bool, site: ResidualJoin,
                  down_input: Optional[torch.Tensor] = None, after_relu: bool = False) -> torch.Tensor:
    """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut)`` of a converted graph (``after_relu``:
    ``relu2(bn2(...)) + shortcut``); ``shortcut`` is ``x`` (``identity``), ``down_bn(down_conv(x))`` or
    ``down_bn(down_conv(down_input))`` (then computed here, fused with the block) or any tensor."""
    from .functional import _hooked, _residual_join

    act1, act2 = _relu_or_default(relu1), _relu_or_default(relu2)
    down = (down_conv, down_bn) if down_conv is not None else None

    def plain() -> torch.Tensor:
        s = shortcut if down is None else down_bn(down_conv(x if down_input is None else down_input))
        if after_relu:
            return act2(bn2(conv2(act1(bn1(conv1(x)))))) + s
        return act2(bn2(conv2(act1(bn1(conv1(x))))) + s)

    if act1 is not act2 and (type(act2) is not nn.ReLU or _hooked(act2)):  # _residual_join checks act1
        return plain()
    return _residual_join(x, conv1, bn1, act1, conv2, bn2, down, None if identity or down else shortcut, site,
                          site.names, plain, down_input, after_relu)


fx.wrap("conv_bn_relu_chain")
fx.wrap("conv_bn_chain")
fx.wrap("conv_bn_relu_conv_chain")
fx.wrap("preact_join")
fx.wrap("bn_relu_chain")
fx.wrap("residual_join")


# ------------------------------------------------------------------ converting a model


def _static_problem_unit(unit: Unit, modules: dict) -> Optional[str]:
    from .functional import _conv_problem, _bn_problem, _module_problem

    conv, bn = modules[unit.conv.target], modules[unit.bn.target]
    problem = _conv_problem(conv, unit.conv.target) or _bn_problem(bn, unit.bn.target,
                                                                    conv._parameters["weight"].shape[0])
    if problem is None and unit.relu is not None and unit.relu.op == "call_module":
        problem = _module_problem(modules[unit.relu.target], unit.relu.target, nn.ReLU, "nn.ReLU")
    return problem


def _join_names(block: Block) -> tuple:
    first, second = block.first, block.second
    relu = first.relu.target if first.relu.op == "call_module" else "relu"
    projection = block.projection
    return (first.conv.target, first.bn.target, relu, second.conv.target, second.bn.target,
            projection.conv.target if projection else "", projection.bn.target if projection else "")


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) or "(model)"


def convert_graph(model: nn.Module) -> tuple[nn.Module, list[Row]]:
    """``model`` traced, its conv -> BN -> ReLU chains and residual blocks fused (module docstring): the
    converted ``fx.GraphModule`` (sharing ``model``'s modules) and the report's rows. A model that
    ``torch.fx`` cannot trace comes back as it is, the report saying why."""
    from .functional import _bn_problem, _conv_problem, _join_problem, _module_problem

    from .models import _fused_rows

    already = {row.path: row.op for row in _fused_rows(model)}  # inside fastres's fused modules
    convs_and_norms = [(name, m) for name, m in model.named_modules()
                       if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase))]
    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # torch.fx refuses data-dependent control flow, some builtins, ...
        why = f"torch.fx cannot trace the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        return model, [Row(name, type(m).__name__, already.get(name), "" if already.get(name) else why)
                       for name, m in convs_and_norms]
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    units = _units(graph, modules)
    taken: dict[str, str] = {}  # module path -> fused op
    reasons: dict[str, str] = {}

    sites = nn.ModuleList()
    gm.add_module("_fastres_sites", sites)

    def site_attr(site: FusedSite) -> fx.Node:
        sites.append(site)
        return graph.get_attr(f"_fastres_sites.{len(sites) - 1}")

    def module_arg(node: Optional[fx.Node]) -> Any:
        if node is None or node.op != "call_module":
            return None
        return graph.get_attr(node.target)

    consumed: set[fx.Node] = set()
    for block in _blocks(units, modules):
        first, second, projection = block.first, block.second, block.projection
        names = _join_names(block)
        down = (modules[projection.conv.target], modules[projection.bn.target]) if projection else None
        identity = block.shortcut is block.input
        problem = _join_problem(modules[first.conv.target], modules[first.bn.target],
                                modules[first.relu.target] if first.relu.op == "call_module" else nn.ReLU(),
                                modules[second.conv.target], modules[second.bn.target], down,
                                None if identity or projection else torch.empty(0), names,
                                block.down_input is not None)
        if problem is not None:
            for node in (first.conv, first.bn, second.conv, second.bn):
                reasons.setdefault(node.target, f"the residual block around it: {problem}")
            continue
        name = _common_prefix([n for n in names if n and n != "relu"])
        with graph.inserting_before(block.last):
            args = (block.input, module_arg(first.conv), module_arg(first.bn), module_arg(first.relu),
                    module_arg(second.conv), module_arg(second.bn),
                    module_arg(second.relu if block.after_relu else block.relu),
                    None if projection else block.shortcut,
                    module_arg(projection.conv) if projection else None,
                    module_arg(projection.bn) if projection else None, identity,
                    site_attr(ResidualJoin(name, names)), block.down_input, block.after_relu)
            fused = graph.call_function(residual_join, args)
        block.last.replace_all_uses_with(fused)
        dead = [block.relu, block.add, second.relu, second.bn, second.conv, first.relu, first.bn, first.conv]
        dead = [node for node in dead if node is not None]
        if projection is not None:
            dead += [projection.bn, projection.conv]
        for node in dead:
            graph.erase_node(node)
        for node in (first.conv, first.bn, second.conv, second.bn) + ((projection.conv, projection.bn)
                                                                      if projection else ()):
            taken[node.target] = f"residual join {name!r}"
        consumed.update(dead)
    chains = _chain_convs(units, modules, consumed)
    unit_bns = {u.bn for u in units.values()}
    for block in _preact_blocks(chains, unit_bns, modules):
        chain, unit = block.chain, block.chain.unit
        problem = (_static_problem_unit(unit, modules)
                   or _conv_problem(modules[chain.conv2.target], chain.conv2.target, stride=1)
                   or (_conv_problem(modules[block.down.target], block.down.target,
                                     stride=modules[unit.conv.target].stride[0]) if block.down is not None else None))
        if problem is not None:
            continue  # the chain-conv below, or the chain, says what it can
        if block.relu0.op == "call_module":
            problem = _module_problem(modules[block.relu0.target], block.relu0.target, nn.ReLU, "nn.ReLU")
            if problem is not None:
                continue
        name = _common_prefix([block.bn0.target, unit.conv.target, chain.conv2.target])
        with graph.inserting_before(chain.last):
            args = (block.input, module_arg(block.bn0), module_arg(block.relu0), module_arg(unit.conv),
                    module_arg(unit.bn), module_arg(unit.relu), module_arg(chain.conv2), module_arg(block.down),
                    site_attr(PreactJoin(name)))
            fused = graph.call_function(preact_join, args)
        chain.last.replace_all_uses_with(fused)
        dead = [chain.add, chain.conv2, unit.relu, unit.bn, unit.conv, block.down, block.relu0, block.bn0]
        for node in dead:
            if node is not None:
                graph.erase_node(node)
        for node in (block.bn0, unit.conv, unit.bn, chain.conv2) + ((block.down,) if block.down is not None else ()):
            taken[node.target] = f"pre-activation block {name!r}"
        consumed.update(node for node in dead if node is not None)
    for chain in chains:
        unit, conv2 = chain.unit, chain.conv2
        if unit.conv in consumed:
            continue
        if _static_problem_unit(unit, modules) is not None:
            continue  # the chain's own reason is given below
        problem = _conv_problem(modules[conv2.target], conv2.target, stride=1)
        if problem is not None:  # the chain alone is fused below
            reasons.setdefault(conv2.target, f"it follows a conv-BN-ReLU chain, but {problem}")
            continue
        with graph.inserting_before(chain.last):
            args = (unit.input, module_arg(unit.conv), module_arg(unit.bn), module_arg(unit.relu), module_arg(conv2),
                    chain.shortcut, site_attr(ConvBNReLUConv(conv2.target)))
            fused = graph.call_function(conv_bn_relu_conv_chain, args)
        chain.last.replace_all_uses_with(fused)
        dead = [chain.add, conv2, unit.relu, unit.bn, unit.conv]
        for node in dead:
            if node is not None:
                graph.erase_node(node)
        op = "conv-BN-ReLU-conv" + (" + residual" if chain.add is not None else "")
        for node in (unit.conv, unit.bn, conv2):
            taken[node.target] = op
        consumed.update(node for node in dead if node is not None)
    for unit in units.values():
        if unit.conv in consumed:
            continue
        problem = _static_problem_unit(unit, modules)
        if problem is not None:
            reasons.setdefault(unit.conv.target, problem)
            reasons.setdefault(unit.bn.target, problem)
            continue
        if unit.relu is None:  # conv -> BN with no ReLU after it
            with graph.inserting_before(unit.bn):
                fused = graph.call_function(conv_bn_chain, (unit.input, module_arg(unit.conv), module_arg(unit.bn),
                                                            site_attr(ConvBNReLUChain(unit.conv.target))))
            unit.bn.replace_all_uses_with(fused)
            graph.erase_node(unit.bn)
            graph.erase_node(unit.conv)
            taken[unit.conv.target] = taken[unit.bn.target] = "conv-BN chain"
            continue
        last = unit.relu if unit.pool is None else unit.pool
        with graph.inserting_before(last):
            pool = None if unit.pool is None else module_arg(unit.pool) or True
            args = (unit.input, module_arg(unit.conv), module_arg(unit.bn), module_arg(unit.relu),
                    site_attr(ConvBNReLUChain(unit.conv.target)), pool)
            fused = graph.call_function(conv_bn_relu_chain, args)
        last.replace_all_uses_with(fused)
        for node in (unit.pool, unit.relu, unit.bn, unit.conv):
            if node is not None:
                graph.erase_node(node)
        taken[unit.conv.target] = taken[unit.bn.target] = ("conv-BN-ReLU-max-pool chain" if unit.pool is not None
                                                           else "conv-BN-ReLU chain")
    for bn in list(graph.nodes):
        if (bn in consumed or bn in unit_bns or _module(bn, modules, nn.BatchNorm2d, nn.SyncBatchNorm) is None
                or len(bn.args) != 1 or bn.kwargs or not isinstance(bn.args[0], fx.Node)):
            continue
        relu = _only_user(bn)
        if relu is None or not _is_relu(relu, modules) or relu.args[0] is not bn:
            continue
        problem = _bn_problem(modules[bn.target], bn.target, modules[bn.target].num_features)
        if problem is None and relu.op == "call_module":
            problem = _module_problem(modules[relu.target], relu.target, nn.ReLU, "nn.ReLU")
        if problem is not None:
            reasons.setdefault(bn.target, problem)
            continue
        with graph.inserting_before(relu):
            fused = graph.call_function(bn_relu_chain, (bn.args[0], module_arg(bn), module_arg(relu),
                                                        site_attr(BNReLU(bn.target))))
        relu.replace_all_uses_with(fused)
        graph.erase_node(relu)
        graph.erase_node(bn)
        taken[bn.target] = "BN-ReLU"
    graph.lint()
    gm.recompile()
    # The original modules, parameters and buffers, in their order: the same state_dict keys.
    gm._modules.clear()
    gm._modules.update(model._modules)
    gm._modules["_fastres_sites"] = sites  # last: no parameters or buffers, the same state_dict
    gm._parameters.clear()
    gm._parameters.update(model._parameters)
    gm._buffers.clear()
    gm._buffers.update(model._buffers)
    gm.train(model.training)
    rows = []
    for name, m in convs_and_norms:
        op = taken.get(name) or already.get(name)
        rows.append(Row(name, type(m).__name__, op, "" if op else reasons.get(name) or _why_not(name, m, graph, modules)))
    return gm, rows


def _why_not(name: str, module: nn.Module, graph: fx.Graph, modules: dict) -> str:
    """Why a conv or BatchNorm that no pattern took stays as it is."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if not calls:
        return "not called by the traced forward (or inside a module traced as a whole: one with hooks)"
    node = calls[0]
    if type(module) is nn.Conv2d:
        user = _only_user(node)
        if _module(user, modules, nn.BatchNorm2d, nn.SyncBatchNorm) is None:
            return "no BatchNorm2d alone takes its output (a conv without a BatchNorm after it is not fused)"
        return "its BatchNorm's output feeds neither a ReLU nor a residual join (conv -> BN alone is not fused yet)"
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        source = node.args[0] if node.args else None
        if isinstance(source, fx.Node) and _module(source, modules, nn.Conv2d) is not None:
            if _only_user(source) is not node:
                return ("its conv's output is also used elsewhere (a pre-activation shortcut, ...): the fused "
                        "ops do not keep the conv's output, only the BatchNorm's")
            return "conv -> BN that no pattern took"
        return ("its input is not a conv's output and no ReLU alone takes its output (a BatchNorm without a ReLU "
                "after it is fused only after a conv)")
    return f"a {type(module).__name__}: fastres fuses nn.Conv2d and nn.BatchNorm2d (or nn.SyncBatchNorm)"
