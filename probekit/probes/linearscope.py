"""LinearScope: the exact input-dependent linear system a network applies to one input.

Navarrete Michelini, Liu, Lu, Jiang, "LinearScope" (ICCV 2019); METHODS.md section 4.

The network is run on two inputs at once, the real input ``x0`` and a probe input ``x1``. Affine layers act on
both (with their biases). Every nonlinear unit takes its *decision* from ``x0`` and applies it to ``x1``:

- pointwise ``f`` (ReLU, LeakyReLU, sigmoid, tanh, GELU, SiLU, ...): ``z1 -> m(z0) * z1`` with
  ``m = f(z0) / z0``. Closed forms where they exist: ReLU ``1[z0 > 0]`` (so 0 at ``z0 = 0``, as autograd),
  LeakyReLU ``1`` / ``slope`` (``slope`` at 0, as autograd), GELU ``Phi(z0)`` exactly, SiLU ``sigmoid(z0)``,
  Hardswish ``clamp(z0 + 3, 0, 6) / 6``, Mish ``tanh(softplus(z0))``. Where ``f(z)/z`` has no closed form, the
  value at ``z0 == 0`` exactly is ``f'(0)`` (sigmoid 1/4, tanh 1, softplus beta/2, ...). For ``f`` with
  ``f(0) != 0`` (sigmoid, softplus, hardsigmoid) that unit then does not reproduce ``f(0)`` at ``x1 = x0``;
  it only happens for pre-activations that are exactly zero.
- max-pool: ``z1`` is read at the argmax positions of ``z0``. Average pooling, BatchNorm in eval mode (running
  statistics), Dropout in eval mode, Flatten, reshapes and residual additions are affine and act on both.
- LayerNorm / InstanceNorm / GroupNorm / RMSNorm: ``z1`` is divided by the standard deviation of ``z0`` (then the
  affine weight/bias). The mean subtraction is a linear map, so by default (``norm_centering="probe"``) it is
  applied to ``z1`` as is (``z1 - mean(z1)``); with ``norm_centering="decision"`` the mean of ``z0`` is frozen
  as well (``z1 - mean(z0)``), which moves ``-w * mean(z0) / std(z0)`` into the bias. Both give
  ``y1(x0) = f(x0)``; only ``"probe"`` keeps ``y1`` linear in ``x1`` when all biases are zero.
  Deviation, stated: METHODS.md reads "normalise z¹ with the statistics of z⁰"; the default freezes only the
  scale, and ``norm_centering="decision"`` is that literal reading.

Then ``y1 = A(x0) x1 + b(x0)`` exactly, with ``b = y1(x1 = 0)`` (all biases pushed through the frozen
decisions). For a ReLU/max-pool network ``A`` is the Jacobian and ``b`` FullGrad's bias term.

The interpreter walks ``nn.Sequential`` trees and dispatches every module on a registry of rules
``rule(module, z0, z1) -> (out0, out1)``. Modules without a rule whose ``forward`` only composes child modules
with linear glue (``+``, reshapes, ``torch.cat``, ...) are traced with ``torch.fx`` and interpreted node by
node. Anything else raises :class:`LinearScopeError` naming the module path and type; nothing is silently
treated as linear. Register rules for custom modules with :func:`register_rule` (global) or
``LinearScope(model, rules={MyBlock: fn})``; inside a rule use :func:`pair_forward` to run a child module.

Products: columns ``A v`` by forward passes of the pair, rows ``A^T u`` by autograd backward through the ``x1``
branch with the decisions frozen (the transposed interpreter), full ``A`` by a batch of basis vectors in one
pass, top singular vectors by Lanczos (``scipy.sparse.linalg.svds``) on those products.

Example
-------
>>> from probekit.digits_cnn import load_digits_cnn, digits_split
>>> from probekit.probes.linearscope import LinearScope
>>> scope = LinearScope(load_digits_cnn(), dtype=torch.float64)      # doctest: +SKIP
>>> x0 = digits_split()[1][0]                                         # (1, 8, 8)
>>> A = scope.matrix(x0)                                              # (10, 64)
>>> res = scope.analyze(x0); res.figures()                           # doctest: +SKIP
"""

from __future__ import annotations

import contextvars
import copy
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..jsonsafe import json_safe

__all__ = [
    "LinearScopeError",
    "PairedLinearization",
    "LinearScope",
    "LinearScopeResult",
    "DatasetBiasShare",
    "register_rule",
    "pair_forward",
    "rule_for",
]

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LinearScopeError(RuntimeError):
    """A module or operation has no LinearScope rule (or cannot be linearised). The message names it."""


# ---------------------------------------------------------------------------
# rule registry
# ---------------------------------------------------------------------------

_RULES: dict[type, Rule] = {}


def register_rule(module_type: type, rule: Rule | None = None):
    """Register ``rule(module, z0, z1) -> (out0, out1)`` for ``module_type`` (global; usable as a decorator).

    ``z0`` has shape ``(B0, ...)`` and ``z1`` ``(B1, ...)`` with ``B0 == 1`` or ``B0 == B1`` (one real input
    for a batch of probe inputs, or one per probe). ``out0`` must be the module's ordinary output on ``z0``;
    ``out1`` must be affine in ``z1`` with every nonlinearity decided by ``z0``. Subclasses inherit a rule
    only if they do not override ``forward``. Inside a rule, run child modules with :func:`pair_forward`.

    Example
    -------
    >>> @register_rule(MyResidual)
    ... def _res(m, z0, z1):
    ...     a0, a1 = pair_forward(m.body, z0, z1)
    ...     return a0 + z0, a1 + z1
    """
    if rule is None:
        return lambda fn: register_rule(module_type, fn)
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    _RULES[module_type] = rule
    return rule


def _lookup(rules: Mapping[type, Rule], module: nn.Module) -> Rule | None:
    cls = type(module)
    for base in cls.__mro__:
        if base in rules:
            # A subclass that overrides forward does something else than the class the rule was written for.
            if base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None):
                return rules[base]
            return None
    return None


def rule_for(module: nn.Module, rules: Mapping[type, Rule] | None = None) -> Rule | None:
    """The rule that would handle ``module`` (``rules`` first, then the global registry), or None."""
    return _lookup(rules or {}, module) or _lookup(_RULES, module)


# -- interpreter context ----------------------------------------------------------------------------


@dataclass
class _Ctx:
    interp: _Interpreter
    module: nn.Module
    path: str


_ACTIVE: contextvars.ContextVar[_Ctx | None] = contextvars.ContextVar("linearscope_active", default=None)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def pair_forward(
    module: nn.Module, z0: torch.Tensor, z1: torch.Tensor, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``module`` on the pair ``(z0, z1)`` with the active LinearScope interpreter (call inside a rule).

    ``name`` is the module's path relative to the current one, for error messages; found automatically when
    ``module`` is a direct child.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        raise LinearScopeError("pair_forward must be called inside a LinearScope rule (no interpreter active)")
    if name is None:
        name = next((n for n, c in ctx.module.named_children() if c is module), type(module).__name__)
    return ctx.interp.run(module, z0, z1, _join(ctx.path, name))


def _centering() -> str:
    ctx = _ACTIVE.get()
    return ctx.interp.norm_centering if ctx is not None else "probe"


# ---------------------------------------------------------------------------
# built-in rules
# ---------------------------------------------------------------------------


def _affine_rule(m: nn.Module, z0: torch.Tensor, z1: torch.Tensor):
    """Modules that are affine in their input (in eval mode): apply to both, biases included."""
    return m(z0), m(z1)


def _sequential_rule(m: nn.Sequential, z0, z1):
    for name, child in m.named_children():
        z0, z1 = pair_forward(child, z0, z1, name)
    return z0, z1


def _mask_rule(mask_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Rule:
    def rule(m, z0, z1):
        return m(z0), mask_fn(m, z0) * z1

    return rule


def _ratio(f: Callable[[torch.Tensor], torch.Tensor], d0: float) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``m = f(z0) / z0``, and ``f'(0) = d0`` where ``z0 == 0`` exactly."""

    def mask(m, z0):
        fz = f(m, z0)
        zero = z0 == 0
        return torch.where(zero, torch.full_like(z0, d0), fz / torch.where(zero, torch.ones_like(z0), z0))

    return mask


def _relu_mask(m, z0):
    return (z0 > 0).to(z0.dtype)


def _leaky_mask(m, z0):
    return torch.where(z0 > 0, torch.ones_like(z0), torch.full_like(z0, m.negative_slope))


def _gelu_mask(m, z0):
    if m.approximate == "tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z0 + 0.044715 * z0 * z0 * z0)))
    return 0.5 * (1.0 + torch.erf(z0 * (1.0 / math.sqrt(2.0))))


def _softplus_mask(m, z0):
    fz = F.softplus(z0, m.beta, m.threshold)
    zero = z0 == 0
    return torch.where(zero, torch.full_like(z0, 0.5), fz / torch.where(zero, torch.ones_like(z0), z0))


def _maxpool_rule(nd: int, adaptive: bool) -> Rule:
    def rule(m, z0, z1):
        if getattr(m, "return_indices", False):
            raise LinearScopeError("max-pool with return_indices=True is not supported in LinearScope")
        if adaptive:
            fn = getattr(F, f"adaptive_max_pool{nd}d")
            out0, idx = fn(z0, m.output_size, return_indices=True)
        else:
            fn = getattr(F, f"max_pool{nd}d")
            out0, idx = fn(z0, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                           return_indices=True)
        if z0.dim() != nd + 2:
            raise LinearScopeError(f"max-pool rule needs batched (N, C, *spatial) input, got shape {tuple(z0.shape)}")
        b1 = z1.shape[0]
        idx_f = idx.flatten(2).expand(b1, -1, -1)
        out1 = z1.flatten(2).gather(2, idx_f).view(b1, *out0.shape[1:])
        return out0, out1

    return rule


def _batchnorm_rule(m: nn.modules.batchnorm._BatchNorm, z0, z1):
    if m.training or m.running_mean is None or m.running_var is None:
        raise LinearScopeError(
            f"{type(m).__name__} without running statistics (or in training mode) normalises with batch "
            "statistics, which is not affine in the input; use track_running_stats=True and eval mode"
        )
    return m(z0), m(z1)


def _normalise(z0, z1, dims: tuple[int, ...], eps: float, center: bool):
    """Return (z0 normalised, z1 normalised with the std of z0); z1 centred per ``norm_centering``."""
    if center:
        mu0 = z0.mean(dim=dims, keepdim=True)
        var0 = (z0 - mu0).pow(2).mean(dim=dims, keepdim=True)
        mu1 = z1.mean(dim=dims, keepdim=True) if _centering() == "probe" else mu0
        inv = torch.rsqrt(var0 + eps)
        return (z0 - mu0) * inv, (z1 - mu1) * inv
    inv = torch.rsqrt(z0.pow(2).mean(dim=dims, keepdim=True) + eps)
    return z0 * inv, z1 * inv


def _layernorm_rule(m: nn.LayerNorm, z0, z1):
    dims = tuple(range(-len(m.normalized_shape), 0))
    _, n1 = _normalise(z0, z1, dims, m.eps, center=True)
    if m.weight is not None:
        n1 = n1 * m.weight
    if getattr(m, "bias", None) is not None:
        n1 = n1 + m.bias
    return m(z0), n1


def _rmsnorm_rule(m, z0, z1):
    dims = tuple(range(-len(m.normalized_shape), 0))
    eps = m.eps if m.eps is not None else torch.finfo(z0.dtype).eps
    _, n1 = _normalise(z0, z1, dims, eps, center=False)
    if m.weight is not None:
        n1 = n1 * m.weight
    return m(z0), n1


def _channel_shape(z: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (z.dim() - 2)


def _instancenorm_rule(m: nn.modules.instancenorm._InstanceNorm, z0, z1):
    if m.track_running_stats and not m.training:
        return m(z0), m(z1)  # running statistics: affine
    if z0.dim() < 3:
        raise LinearScopeError(f"{type(m).__name__} rule needs batched (N, C, *spatial) input")
    _, n1 = _normalise(z0, z1, tuple(range(2, z0.dim())), m.eps, center=True)
    if m.affine:
        n1 = n1 * m.weight.view(_channel_shape(z1)) + m.bias.view(_channel_shape(z1))
    return m(z0), n1


def _groupnorm_rule(m: nn.GroupNorm, z0, z1):
    g = m.num_groups
    s0 = z0.reshape(z0.shape[0], g, -1)
    s1 = z1.reshape(z1.shape[0], g, -1)
    _, n1 = _normalise(s0, s1, (2,), m.eps, center=True)
    n1 = n1.view(z1.shape)
    if m.affine:
        n1 = n1 * m.weight.view(_channel_shape(z1)) + m.bias.view(_channel_shape(z1))
    return m(z0), n1


def _dropout_rule(m, z0, z1):
    if m.training:
        raise LinearScopeError(f"{type(m).__name__} in training mode is random; LinearScope runs in eval mode")
    return z0, z1


def _install_builtin_rules() -> None:
    for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
              nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Flatten, nn.Unflatten, nn.Identity,
              nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
              nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle):
        _RULES[t] = _affine_rule
    _RULES[nn.Upsample] = lambda m, z0, z1: (
        (m(z0), m(z1)) if m.mode == "nearest" or m.mode.startswith(("linear", "bilinear", "trilinear"))
        else _raise(f"Upsample mode {m.mode!r} is not linear")
    )
    _RULES[nn.Sequential] = _sequential_rule
    for t in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
        _RULES[t] = _dropout_rule
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        _RULES[t] = _batchnorm_rule
    for t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        _RULES[t] = _instancenorm_rule
    _RULES[nn.LayerNorm] = _layernorm_rule
    _RULES[nn.GroupNorm] = _groupnorm_rule
    if hasattr(nn, "RMSNorm"):
        _RULES[nn.RMSNorm] = _rmsnorm_rule
    for t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        _RULES[t] = _maxpool_rule(int(t.__name__[-2]), adaptive=False)
    for t in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
        _RULES[t] = _maxpool_rule(int(t.__name__[-2]), adaptive=True)
    # pointwise nonlinearities: m(z0) * z1
    _RULES[nn.ReLU] = _mask_rule(_relu_mask)
    _RULES[nn.LeakyReLU] = _mask_rule(_leaky_mask)
    _RULES[nn.GELU] = _mask_rule(_gelu_mask)
    _RULES[nn.SiLU] = _mask_rule(lambda m, z0: torch.sigmoid(z0))
    _RULES[nn.Mish] = _mask_rule(lambda m, z0: torch.tanh(F.softplus(z0)))
    _RULES[nn.Hardswish] = _mask_rule(lambda m, z0: (z0 + 3.0).clamp(0.0, 6.0) / 6.0)
    _RULES[nn.Sigmoid] = _mask_rule(_ratio(lambda m, z: torch.sigmoid(z), 0.25))
    _RULES[nn.Tanh] = _mask_rule(_ratio(lambda m, z: torch.tanh(z), 1.0))
    _RULES[nn.Softsign] = _mask_rule(lambda m, z0: 1.0 / (1.0 + z0.abs()))
    _RULES[nn.ELU] = _mask_rule(_ratio(lambda m, z: F.elu(z, m.alpha), 1.0))
    _RULES[nn.CELU] = _mask_rule(_ratio(lambda m, z: F.celu(z, m.alpha), 1.0))
    _RULES[nn.SELU] = _mask_rule(_ratio(lambda m, z: F.selu(z), 1.0507009873554805))
    _RULES[nn.ReLU6] = _mask_rule(_ratio(lambda m, z: F.relu6(z), 1.0))
    _RULES[nn.Hardtanh] = _mask_rule(_ratio(lambda m, z: F.hardtanh(z, m.min_val, m.max_val), 1.0))
    _RULES[nn.Hardsigmoid] = _mask_rule(_ratio(lambda m, z: F.hardsigmoid(z), 1.0 / 6.0))
    _RULES[nn.Softplus] = _mask_rule(_softplus_mask)


def _raise(msg: str):
    raise LinearScopeError(msg)


_install_builtin_rules()


# ---------------------------------------------------------------------------
# torch.fx fallback for modules that compose children
# ---------------------------------------------------------------------------


class _P:
    """A value carried on both branches (x0 and x1)."""

    __slots__ = ("v0", "v1")

    def __init__(self, v0, v1):
        self.v0, self.v1 = v0, v1


def _branch(a, i: int):
    if isinstance(a, _P):
        return a.v1 if i else a.v0
    if isinstance(a, (list, tuple)):
        return type(a)(_branch(x, i) for x in a)
    if isinstance(a, dict):
        return {k: _branch(v, i) for k, v in a.items()}
    return a


def _paired_tensors(a) -> int:
    if isinstance(a, _P):
        return int(isinstance(a.v0, torch.Tensor))
    if isinstance(a, (list, tuple)):
        return sum(_paired_tensors(x) for x in a)
    if isinstance(a, dict):
        return sum(_paired_tensors(x) for x in a.values())
    return 0


# Ops that act on each branch independently and are affine in their (paired) tensor arguments, possibly
# given constants / shapes. Multiplicative ones are checked to have at most one paired tensor operand.
_BRANCHWISE_FUNCS = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, getattr,
    operator.mul, operator.truediv, operator.matmul, torch.mul, torch.div, torch.matmul, torch.add, torch.sub, torch.neg, torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack,
    torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.split, torch.chunk, torch.narrow,
    torch.sum, torch.mean, torch.movedim, torch.roll, torch.flip,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.pad, F.pixel_shuffle, F.pixel_unshuffle,
}
_MULTIPLICATIVE_FUNCS = {operator.mul, operator.truediv, operator.matmul, torch.mul, torch.div, torch.matmul,
                         F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                         F.conv_transpose3d}
_BRANCHWISE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "squeeze", "unsqueeze",
    "size", "expand", "expand_as", "repeat", "add", "sub", "neg", "sum", "mean", "chunk", "split", "narrow",
    "clone", "movedim", "mul", "div", "matmul", "roll", "flip",
}
_MULTIPLICATIVE_METHODS = {"mul", "div", "matmul"}
_DIVISIONS = {operator.truediv, torch.div, "div"}


def _functional_modules() -> dict[Any, Callable[..., nn.Module]]:
    return {
        F.relu: lambda *a, **k: nn.ReLU(), torch.relu: lambda *a, **k: nn.ReLU(), "relu": lambda *a, **k: nn.ReLU(),
        torch.sigmoid: lambda *a, **k: nn.Sigmoid(), F.sigmoid: lambda *a, **k: nn.Sigmoid(),
        "sigmoid": lambda *a, **k: nn.Sigmoid(),
        torch.tanh: lambda *a, **k: nn.Tanh(), F.tanh: lambda *a, **k: nn.Tanh(), "tanh": lambda *a, **k: nn.Tanh(),
        F.silu: lambda *a, **k: nn.SiLU(),
        F.gelu: lambda *a, approximate="none", **k: nn.GELU(approximate=approximate),
        F.leaky_relu: lambda *a, negative_slope=0.01, **k: nn.LeakyReLU(a[0] if a else negative_slope),
        F.max_pool1d: lambda *a, **k: nn.MaxPool1d(*a, **k), F.max_pool2d: lambda *a, **k: nn.MaxPool2d(*a, **k),
        F.max_pool3d: lambda *a, **k: nn.MaxPool3d(*a, **k),
    }


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # every child is dispatched recursively
        return True


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))


# ---------------------------------------------------------------------------
# interpreter
# ---------------------------------------------------------------------------


class _Interpreter:
    def __init__(self, rules: Mapping[type, Rule], norm_centering: str) -> None:
        self.rules = dict(rules)
        self.norm_centering = norm_centering
        self._graphs: dict[int, torch.fx.Graph] = {}

    def run(self, module: nn.Module, z0, z1, path: str):
        rule = rule_for(module, self.rules)
        token = _ACTIVE.set(_Ctx(self, module, path))
        try:
            if rule is not None:
                return rule(module, z0, z1)
            if next(module.children(), None) is not None:
                return self._run_fx(module, z0, z1, path)
            raise LinearScopeError(self._unsupported(module, path))
        finally:
            _ACTIVE.reset(token)

    @staticmethod
    def _unsupported(module: nn.Module, path: str, extra: str = "") -> str:
        t = type(module)
        return (
            f"no LinearScope rule for module {path or '<root>'!r} of type {t.__module__}.{t.__qualname__}"
            f"{extra}; register one with probekit.probes.linearscope.register_rule({t.__name__}, fn) or pass "
            f"LinearScope(model, rules={{{t.__name__}: fn}}) where fn(module, z0, z1) -> (out0, out1)"
        )

    def _graph(self, module: nn.Module, path: str) -> torch.fx.Graph:
        key = id(module)
        if key not in self._graphs:
            try:
                self._graphs[key] = _Tracer().trace(module)
            except Exception as exc:  # noqa: BLE001 - report any tracing failure as unsupported
                raise LinearScopeError(
                    self._unsupported(module, path, f" (and its forward could not be traced by torch.fx: {exc})")
                ) from exc
        return self._graphs[key]

    def _run_fx(self, module: nn.Module, z0, z1, path: str):
        graph = self._graph(module, path)
        env: dict[torch.fx.Node, Any] = {}
        first = True
        funcs = _functional_modules()

        def load(a):
            return torch.fx.node.map_arg(a, lambda n: env[n])

        for node in graph.nodes:
            where = f"{path or '<root>'} ({type(module).__name__}), node {node.name!r} ({node.op} {_op_name(node)})"
            if node.op == "placeholder":
                if first:
                    env[node] = _P(z0, z1)
                    first = False
                elif node.args:
                    env[node] = node.args[0]  # default value
                else:
                    raise LinearScopeError(f"{where}: forward takes more than one required input")
            elif node.op == "get_attr":
                obj = module
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                env[node] = obj
            elif node.op == "call_module":
                sub = module.get_submodule(str(node.target))
                args, kwargs = load(node.args), load(node.kwargs)
                if len(args) != 1 or kwargs or not isinstance(args[0], _P):
                    raise LinearScopeError(f"{where}: submodule calls must take exactly one traced tensor")
                token = _ACTIVE.set(_Ctx(self, module, path))
                try:
                    env[node] = _P(*self.run(sub, args[0].v0, args[0].v1, _join(path, str(node.target))))
                finally:
                    _ACTIVE.reset(token)
            elif node.op in ("call_function", "call_method"):
                args, kwargs = load(node.args), load(node.kwargs)
                n_paired = _paired_tensors(args) + _paired_tensors(kwargs)
                if n_paired == 0 and not any(isinstance(x, _P) for x in list(args) + list(kwargs.values())):
                    env[node] = self._call(node, args, kwargs)  # constant computation
                    continue
                target = node.target
                if target in funcs:
                    x = args[0] if node.op == "call_method" or args else kwargs.get("input")
                    rest = args[1:]
                    m = funcs[target](*rest, **{k: v for k, v in kwargs.items() if k != "input"})
                    r = rule_for(m, self.rules)
                    env[node] = _P(*r(m, x.v0, x.v1))
                    continue
                ok = target in _BRANCHWISE_FUNCS if node.op == "call_function" else target in _BRANCHWISE_METHODS
                if not ok:
                    raise LinearScopeError(
                        f"{where}: operation is not known to be affine and has no LinearScope rule; wrap it in a "
                        "module and register a rule for it"
                    )
                mult = target in (_MULTIPLICATIVE_FUNCS if node.op == "call_function" else _MULTIPLICATIVE_METHODS)
                if mult and n_paired > 1:
                    raise LinearScopeError(f"{where}: product of two input-dependent tensors is not linear")
                if target in _DIVISIONS:
                    divisor = args[1] if len(args) > 1 else kwargs.get("other")
                    if _paired_tensors(divisor):
                        raise LinearScopeError(f"{where}: division by an input-dependent tensor is not linear")
                env[node] = _P(self._call(node, _branch(args, 0), _branch(kwargs, 0)),
                               self._call(node, _branch(args, 1), _branch(kwargs, 1)))
            elif node.op == "output":
                out = load(node.args[0])
                if not isinstance(out, _P) or not isinstance(out.v0, torch.Tensor):
                    raise LinearScopeError(f"{where}: forward must return one tensor")
                return out.v0, out.v1
        raise LinearScopeError(f"{path}: traced graph has no output")  # pragma: no cover

    @staticmethod
    def _call(node: torch.fx.Node, args, kwargs):
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        return node.target(*args, **kwargs)


# ---------------------------------------------------------------------------
# products, SVD and analyses (shared with other interpreters, e.g. transformers)
# ---------------------------------------------------------------------------


class PairedLinearization(ABC):
    """Products with ``A(x0)``, its SVD and classifier analyses, given a paired forward.

    Subclasses implement :meth:`_pair` (batched). Everything else works on one real input ``x0`` of shape
    ``in_shape`` (e.g. ``(C, H, W)`` or ``(d,)``); ``A`` has shape ``(n_out, n_in)`` with ``n_in = prod(in_shape)``
    and ``n_out = prod(out_shape)`` (input and output flattened, C order).
    """

    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    chunk_size: int = 4096

    @abstractmethod
    def _pair(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Paired forward, batched.

        Parameters
        ----------
        x0 : Tensor of shape (B0, *in_shape)
        x1 : Tensor of shape (B1, *in_shape), with B0 == 1 or B0 == B1

        Returns
        -------
        y0 : Tensor of shape (B0, *out_shape), the network output on x0
        y1 : Tensor of shape (B1, *out_shape), A(x0) x1 + b(x0)
        """

    # -- helpers --------------------------------------------------------------------------------------

    def _t(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        return x.detach().to(device=self.device, dtype=self.dtype)

    def _run(self, x0: torch.Tensor, x1: torch.Tensor):
        with torch.inference_mode(False), torch.no_grad():
            return self._pair(x0, x1)

    # -- paired forward --------------------------------------------------------------------------------

    def forward_pair(self, x0: Any, x1: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the network on the real input ``x0`` and the probe input ``x1``.

        Parameters
        ----------
        x0 : Tensor of shape in_shape
            One input, e.g. ``(C, H, W)`` or ``(d,)`` (no batch dimension).
        x1 : Tensor of shape in_shape or (N, *in_shape)
            One probe input or a batch of them.

        Returns
        -------
        y0 : Tensor of shape out_shape
            The network output on ``x0``.
        y1 : Tensor of shape out_shape or (N, *out_shape)
            ``A(x0) x1 + b(x0)``.
        """
        x0, x1 = self._t(x0), self._t(x1)
        single = x1.dim() == x0.dim()
        if not single and (x1.dim() != x0.dim() + 1 or x1.shape[1:] != x0.shape):
            raise ValueError(f"x1 must have shape {tuple(x0.shape)} or (N, *{tuple(x0.shape)}); got {tuple(x1.shape)}")
        if single and x1.shape != x0.shape:
            raise ValueError(f"x1 must have the shape of x0 {tuple(x0.shape)}; got {tuple(x1.shape)}")
        y0, y1 = self._run(x0[None], x1[None] if single else x1)
        return y0[0], (y1[0] if single else y1)

    def output(self, x0: Any) -> torch.Tensor:
        """The network output ``f(x0)``, shape ``out_shape``."""
        x0 = self._t(x0)
        return self._run(x0[None], x0[None])[0][0]

    def bias(self, x0: Any) -> torch.Tensor:
        """``b(x0) = y1(x1 = 0)``: every bias pushed through the decisions of ``x0``. Shape ``(n_out,)``."""
        x0 = self._t(x0)
        return self._run(x0[None], torch.zeros_like(x0)[None])[1].reshape(-1)

    def apply(self, x0: Any, v: Any) -> torch.Tensor:
        """``A(x0) v`` by one paired forward (``y1(v) - b``).

        Parameters
        ----------
        x0 : Tensor of shape in_shape
        v : Tensor of shape (n_in,) or (N, n_in) (or in_shape / (N, *in_shape))

        Returns
        -------
        Tensor of shape (n_out,) or (N, n_out)
        """
        x0 = self._t(x0)
        v = self._t(v)
        n_in = x0.numel()
        single = v.numel() == n_in and (v.dim() == 1 or v.shape == x0.shape)
        V = v.reshape(-1, *x0.shape)
        zero = torch.zeros_like(x0)[None]
        _, y = self._run(x0[None], torch.cat([zero, V]))
        y = y.reshape(len(V) + 1, -1)
        out = y[1:] - y[:1]
        return out[0] if single else out

    def apply_transpose(self, x0: Any, u: Any) -> torch.Tensor:
        """``A(x0)^T u`` by autograd backward through the ``x1`` branch with the decisions of ``x0`` frozen.

        Parameters
        ----------
        x0 : Tensor of shape in_shape
        u : Tensor of shape (n_out,) or (N, n_out)

        Returns
        -------
        Tensor of shape (n_in,) or (N, n_in)
        """
        x0 = self._t(x0)
        u = self._t(u)
        single = u.dim() == 1
        U = u.reshape(-1, u.shape[-1])
        with torch.inference_mode(False), torch.enable_grad():
            x1 = torch.zeros((len(U), *x0.shape), dtype=self.dtype, device=self.device, requires_grad=True)
            _, y1 = self._pair(x0[None], x1)
            y1 = y1.reshape(len(U), -1)
            if y1.shape[1] != U.shape[1]:
                raise ValueError(f"u must have n_out = {y1.shape[1]} entries per row; got shape {tuple(u.shape)}")
            (g,) = torch.autograd.grad(y1, x1, grad_outputs=U)
        g = g.reshape(len(U), -1)
        return g[0] if single else g

    def matrix(
        self, x0: Any, *, method: Literal["columns", "rows", "loop"] = "columns", chunk_size: int | None = None
    ) -> torch.Tensor:
        """The full matrix ``A(x0)``, shape ``(n_out, n_in)``.

        Parameters
        ----------
        x0 : Tensor of shape in_shape
        method : {"columns", "rows", "loop"}, default="columns"
            ``"columns"``: basis vectors ``e_p`` fed as a batch of probe inputs, ``chunk_size`` at a time (one
            paired forward per chunk). ``"rows"``: ``A^T e_k`` by batched backward passes (cheaper when
            ``n_out << n_in``). ``"loop"``: one forward per column (the reference, for benchmarks).
        chunk_size : int, optional
            Basis vectors per pass (default ``self.chunk_size``).
        """
        x0 = self._t(x0)
        n_in = x0.numel()
        chunk = int(chunk_size or self.chunk_size)
        if method == "loop":
            b = self.bias(x0)
            cols = []
            for p in range(n_in):
                e = torch.zeros(n_in, dtype=self.dtype, device=self.device)
                e[p] = 1
                cols.append(self._run(x0[None], e.view(1, *x0.shape))[1].reshape(-1) - b)
            return torch.stack(cols, dim=1)
        if method == "columns":
            b = self.bias(x0)
            blocks = []
            for s in range(0, n_in, chunk):
                m = min(chunk, n_in - s)
                E = torch.zeros(m, n_in, dtype=self.dtype, device=self.device)
                E[torch.arange(m), torch.arange(s, s + m)] = 1
                blocks.append(self._run(x0[None], E.view(m, *x0.shape))[1].reshape(m, -1) - b)
            return torch.cat(blocks).T.contiguous()
        if method == "rows":
            n_out = self.bias(x0).numel()
            blocks = []
            for s in range(0, n_out, chunk):
                m = min(chunk, n_out - s)
                U = torch.zeros(m, n_out, dtype=self.dtype, device=self.device)
                U[torch.arange(m), torch.arange(s, s + m)] = 1
                blocks.append(self.apply_transpose(x0, U))
            return torch.cat(blocks)
        raise ValueError(f"method must be 'columns', 'rows' or 'loop', got {method!r}")

    def matrix_loop(self, x0: Any) -> torch.Tensor:
        """``matrix(x0, method="loop")``: one paired forward per column (reference / benchmark)."""
        return self.matrix(x0, method="loop")

    def linear_operator(self, x0: Any):
        """``scipy.sparse.linalg.LinearOperator`` of ``A(x0)`` (float64) from :meth:`apply` / :meth:`apply_transpose`."""
        from scipy.sparse.linalg import LinearOperator

        x0 = self._t(x0)
        n_in = x0.numel()
        n_out = self.bias(x0).numel()

        def mv(v):
            return self.apply(x0, np.asarray(v, dtype=np.float64).reshape(n_in)).double().cpu().numpy()

        def rmv(u):
            return self.apply_transpose(x0, np.asarray(u, dtype=np.float64).reshape(n_out)).double().cpu().numpy()

        def mm(V):
            return self.apply(x0, np.asarray(V, dtype=np.float64).T).double().cpu().numpy().T

        def rmm(U):
            return self.apply_transpose(x0, np.asarray(U, dtype=np.float64).T).double().cpu().numpy().T

        return LinearOperator((n_out, n_in), matvec=mv, rmatvec=rmv, matmat=mm, rmatmat=rmm, dtype=np.float64)

    def svd(self, x0: Any, k: int = 4, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` singular triplets of ``A(x0)`` by Lanczos (``scipy.sparse.linalg.svds``, ARPACK) on products.

        ``k`` must be below ``min(n_out, n_in)`` (ARPACK's limit); use ``torch.linalg.svd(self.matrix(x0))``
        for the full decomposition of a small ``A``.

        Returns
        -------
        U : ndarray of shape (n_out, k)
        S : ndarray of shape (k,), descending
        Vt : ndarray of shape (k, n_in); each row reshapes to ``in_shape``
        """
        from scipy.sparse.linalg import svds

        op = self.linear_operator(x0)
        kmax = min(op.shape) - 1
        if not 1 <= k <= kmax:
            raise ValueError(f"k must be in [1, {kmax}] for A of shape {op.shape} (svds needs k < min(shape))")
        v0 = np.random.default_rng(seed).standard_normal(min(op.shape))
        U, S, Vt = svds(op, k=k, v0=v0, solver="arpack")
        order = np.argsort(S)[::-1]
        return U[:, order], S[order], Vt[order]

    # -- classifier analyses ---------------------------------------------------------------------------

    def class_votes(self, x0: Any, k: int) -> torch.Tensor:
        """Row ``k`` of ``A(x0)`` (one backward pass), reshaped as the input: the per-pixel votes for class ``k``.

        Returns
        -------
        Tensor of shape in_shape; ``(votes * x0).sum() + bias(x0)[k]`` is logit ``k``.
        """
        x0 = self._t(x0)
        n_out = self.bias(x0).numel()
        if not 0 <= k < n_out:
            raise ValueError(f"class k={k} out of range [0, {n_out})")
        u = torch.zeros(n_out, dtype=self.dtype, device=self.device)
        u[k] = 1
        return self.apply_transpose(x0, u).reshape(x0.shape)

    def bias_share(self, x0: Any) -> torch.Tensor:
        """``b_k(x0) / y_k(x0)`` per output: the part of each logit that does not depend on the input pixels.

        Returns
        -------
        Tensor of shape (n_out,). Large magnitudes mean ``y_k`` is near zero, not that the bias is large.
        """
        x0 = self._t(x0)
        return self.bias(x0) / self.output(x0).reshape(-1)

    def dataset_bias_share(self, X: Any, y: Any | None = None, *, batch_size: int = 256) -> DatasetBiasShare:
        """Bias share over a data set (one paired forward per batch, each row its own ``x0``).

        Parameters
        ----------
        X : Tensor of shape (n, *in_shape)
        y : Tensor of shape (n,), optional
            True labels (for accuracy and per-true-class means).
        """
        X = self._t(X)
        bs, ys = [], []
        for s in range(0, len(X), batch_size):
            xb = X[s : s + batch_size]
            y0, y1 = self._run(xb, torch.zeros_like(xb))
            bs.append(y1.reshape(len(xb), -1))
            ys.append(y0.reshape(len(xb), -1))
        b = torch.cat(bs).double().cpu().numpy()
        out = torch.cat(ys).double().cpu().numpy()
        return DatasetBiasShare.from_arrays(out, b, None if y is None else np.asarray(torch.as_tensor(y).cpu()))

    def analyze(self, x0: Any, *, target: int | None = None, k: int = 4, label: int | None = None) -> LinearScopeResult:
        """Full analysis of one input of a classifier: ``A``, ``b``, bias shares, votes, top singular vectors.

        Parameters
        ----------
        x0 : Tensor of shape in_shape
        target : int, optional
            Class whose votes are shown (default: the predicted class).
        k : int, default=4
            Number of singular triplets (clipped to ``min(n_out, n_in) - 1``).
        label : int, optional
            True label, recorded in the result.
        """
        x0 = self._t(x0)
        A = self.matrix(x0)
        b = self.bias(x0)
        y = self.output(x0).reshape(-1)
        pred = int(y.argmax())
        target = pred if target is None else int(target)
        kk = max(1, min(k, min(A.shape) - 1))
        U, S, Vt = self.svd(x0, kk)
        recon = A @ x0.reshape(-1) + b
        rel = float((recon - y).norm() / y.norm().clamp_min(torch.finfo(self.dtype).tiny))
        return LinearScopeResult(
            input=x0.double().cpu().numpy(),
            logits=y.double().cpu().numpy(),
            bias=b.double().cpu().numpy(),
            matrix=A.double().cpu().numpy(),
            predicted=pred,
            target=target,
            label=label,
            singular_values=S,
            left_singular_vectors=U,
            right_singular_vectors=Vt,
            reconstruction_rel_error=rel,
            dtype=str(self.dtype).replace("torch.", ""),
        )


class LinearScope(PairedLinearization):
    """LinearScope of an ``nn.Module`` built from supported modules (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Taking one batched tensor ``(N, *in_shape)``. A deep copy is taken, put in eval mode, cast to ``dtype``
        and its parameters frozen; the caller's model is not modified.
    dtype : torch.dtype, default=torch.float32
        ``torch.float64`` for exact checks (the copy is cast).
    rules : mapping of module type -> rule, optional
        Extra rules ``rule(module, z0, z1) -> (out0, out1)`` for this scope, taking precedence over the global
        registry (:func:`register_rule`).
    norm_centering : {"probe", "decision"}, default="probe"
        How Layer/Instance/GroupNorm centre ``z1``: with its own mean (a linear map) or with the mean of ``z0``.
    chunk_size : int, default=4096
        Basis vectors per paired forward in :meth:`matrix`.
    device : torch.device or str, optional
        Default: the device of the model's first parameter (CPU if none).

    Examples
    --------
    >>> scope = LinearScope(model, dtype=torch.float64)
    >>> y0, y1 = scope.forward_pair(x0, x0)      # y1 == y0 == model(x0[None])[0]
    >>> A, b = scope.matrix(x0), scope.bias(x0)  # model(x0) == A @ x0.flatten() + b
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
        rules: Mapping[type, Rule] | None = None,
        norm_centering: Literal["probe", "decision"] = "probe",
        chunk_size: int = 4096,
        device: torch.device | str | None = None,
    ) -> None:
        if norm_centering not in ("probe", "decision"):
            raise ValueError(f"norm_centering must be 'probe' or 'decision', got {norm_centering!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_size = int(chunk_size)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.norm_centering = norm_centering
        self._interp = _Interpreter(rules or {}, norm_centering)
        # Fail early on unsupported leaf modules (fx-traced ones are checked when first run).
        self._check_supported(self.model, "")

    def _check_supported(self, module: nn.Module, path: str) -> None:
        r = rule_for(module, self._interp.rules)
        if r is _sequential_rule:
            for name, child in module.named_children():
                self._check_supported(child, _join(path, name))
        elif r is None and next(module.children(), None) is None:
            raise LinearScopeError(self._interp._unsupported(module, path))

    def _pair(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x0.shape[0] not in (1, x1.shape[0]):
            raise ValueError(f"x0 batch {x0.shape[0]} must be 1 or equal to the x1 batch {x1.shape[0]}")
        return self._interp.run(self.model, x0, x1, "")


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


def _heatmap(img: np.ndarray, title: str, diverging: bool = True, colorbar: str = "value"):
    import plotly.graph_objects as go

    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 3:  # (C, H, W): show the channel mean
        img = img.mean(axis=0)
    if img.ndim == 1:
        img = img[None]
    lim = float(np.abs(img).max()) or 1.0
    kw = {"colorscale": "RdBu", "zmid": 0.0, "zmin": -lim, "zmax": lim} if diverging else {"colorscale": "Greys"}
    fig = go.Figure(go.Heatmap(z=img, colorbar={"title": {"text": colorbar}}, **kw))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    fig.update_layout(title=title, template="plotly_white", width=420, height=420, xaxis_title="pixel column",
                      yaxis_title="pixel row")
    return fig


@dataclass
class LinearScopeResult:
    """LinearScope of one input of a classifier.

    Attributes
    ----------
    input : ndarray of shape in_shape
    logits : ndarray of shape (n_out,)
        ``f(x0)``.
    bias : ndarray of shape (n_out,)
        ``b(x0)``; ``logits == matrix @ input.ravel() + bias``.
    matrix : ndarray of shape (n_out, n_in)
        ``A(x0)``; row ``k`` reshaped to ``in_shape`` is the vote image of class ``k``.
    predicted, target : int
        Predicted class and the class whose votes are shown.
    label : int or None
    singular_values : ndarray of shape (k,)
    left_singular_vectors : ndarray of shape (n_out, k)
    right_singular_vectors : ndarray of shape (k, n_in)
    reconstruction_rel_error : float
        ``||A x0 + b - f(x0)|| / ||f(x0)||``.
    dtype : str
    """

    input: np.ndarray
    logits: np.ndarray
    bias: np.ndarray
    matrix: np.ndarray
    predicted: int
    target: int
    label: int | None
    singular_values: np.ndarray
    left_singular_vectors: np.ndarray
    right_singular_vectors: np.ndarray
    reconstruction_rel_error: float
    dtype: str = "float32"

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.input))

    @property
    def bias_share(self) -> np.ndarray:
        """``bias / logits``, shape (n_out,)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.bias / self.logits

    def class_votes(self, k: int | None = None) -> np.ndarray:
        """Row ``k`` (default ``target``) of ``A`` reshaped to ``in_shape``."""
        return self.matrix[self.target if k is None else k].reshape(self.in_shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists of floats; non-finite bias shares become None)."""
        d = asdict(self)
        d["in_shape"] = list(self.in_shape)
        share = self.bias_share
        d["bias_share"] = [float(s) if np.isfinite(s) else None for s in share]
        return json_safe(d)

    def _image(self, a: np.ndarray) -> np.ndarray:
        """``a`` (n_in values) as a 2-D image: reshaped to ``in_shape``, channels averaged, flat squares folded."""
        img = np.asarray(a, dtype=np.float64).reshape(self.in_shape)
        if img.ndim == 3:  # (C, H, W): the channel mean
            img = img.mean(axis=0)
        if img.ndim == 1:
            side = int(round(math.sqrt(img.size)))
            img = img.reshape(side, side) if side * side == img.size else img[None]
        return img

    def bias_share_figure(self, *, test_mean: float | None = None) -> Any:
        """Bars of the bias share ``b_k / y_k`` per class, the predicted class in red.

        Reads ``bias``, ``logits`` (through :attr:`bias_share`; a non-finite share is left out) and ``predicted``.

        Parameters
        ----------
        test_mean : float, optional
            The test-set mean share at the predicted class (``DatasetBiasShare.mean_share_predicted``), named in
            the title.
        """
        import plotly.graph_objects as go

        share = [float(s) if np.isfinite(s) else None for s in self.bias_share]
        fig = go.Figure(go.Bar(x=[str(k) for k in range(len(share))], y=share, name="b_k / y_k",
                               marker_color=["#d62728" if k == self.predicted else "#1f77b4"
                                             for k in range(len(share))]))
        title = "Bias share b_k / y_k per class (red: predicted)"
        if test_mean is not None:
            title += f"; test-set mean at the predicted class {test_mean:+.3f}"
        fig.update_layout(title=title, xaxis_title="class", yaxis_title="b_k / y_k", template="plotly_white")
        return fig

    def digit_rows_figure(self, *, index: int | None = None, cols: int = 6) -> Any:
        """The input, then each class row of ``A`` as an image on one shared colour scale.

        Reads ``input``, ``matrix`` (n_out, n_in), ``label`` and ``predicted``.

        Parameters
        ----------
        index : int, optional
            Data-set index of the input, named in the title.
        cols : int
            Images per row of the grid.
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        n_cls = len(self.matrix)
        rows = -(-(n_cls + 1) // cols)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=["input"] + [f"row {k}" for k in range(n_cls)],
                            horizontal_spacing=0.02, vertical_spacing=0.12)
        # rows flipped: a heatmap draws its first row at the bottom, an image at the top
        fig.add_trace(go.Heatmap(z=self._image(self.input)[::-1].tolist(), colorscale="gray_r", showscale=False,
                                 name="input"), row=1, col=1)
        lim = float(np.abs(self.matrix).max()) or 1.0
        for k in range(n_cls):
            r, c = divmod(k + 1, cols)
            fig.add_trace(go.Heatmap(z=self._image(self.matrix[k])[::-1].tolist(), zmin=-lim, zmax=lim,
                                     colorscale="RdBu", showscale=k == 0, name=f"class {k}",
                                     colorbar={"title": "A(x) entry"}), row=r + 1, col=c + 1)
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False, scaleanchor="x")
        which = "Test digit" if index is None else f"Digit {index}"
        fig.update_layout(title=f"{which}: label {self.label}, predicted {self.predicted} — class rows of A(x) "
                                "(y = A x + b exactly)", template="plotly_white", height=120 + 250 * rows,
                          margin={"t": 90, "b": 30})  # the image grid fills ≥ 60 % of the figure
        return fig

    def figures(self, *, test_mean_share: float | None = None) -> list[Any]:
        """Plotly figures: input, votes of ``target``, votes x input, bias share per class, singular vectors.

        Parameters
        ----------
        test_mean_share : float, optional
            Test-set mean bias share at the predicted class, named in the bias-share figure's title.

        Returns
        -------
        list of plotly.graph_objects.Figure
        """
        import plotly.graph_objects as go

        figs = [_heatmap(self.input, f"input (label {self.label}, predicted {self.predicted})", diverging=False,
                         colorbar="pixel value")]
        votes = self.class_votes()
        figs.append(_heatmap(votes, f"class {self.target}: row of A (votes per pixel)", colorbar="vote (logit per unit pixel)"))
        figs.append(_heatmap(votes * self.input, f"class {self.target}: votes x input (sum + b = logit)",
                             colorbar="contribution to the logit"))
        n = len(self.logits)
        x = [str(k) for k in range(n)]
        bar = go.Figure()
        bar.add_trace(go.Bar(x=x, y=list(self.matrix @ self.input.ravel()), name="A x0 (input part)"))
        bar.add_trace(go.Bar(x=x, y=list(self.bias), name="b (bias part)"))
        bar.add_trace(go.Scatter(x=x, y=list(self.logits), mode="markers", name="logit", marker={"color": "black"}))
        bar.update_layout(barmode="relative", title="logit = input part + bias part, per class",
                          xaxis_title="class", yaxis_title="logit", template="plotly_white")
        figs.append(bar)
        figs.append(self.bias_share_figure(test_mean=test_mean_share))
        for i, s in enumerate(self.singular_values):
            figs.append(_heatmap(self.right_singular_vectors[i].reshape(self.in_shape),
                                 f"right singular vector {i + 1} (sigma = {s:.3g})", colorbar="component"))
        return figs


@dataclass
class DatasetBiasShare:
    """Bias share ``b_k / y_k`` over a data set.

    Attributes
    ----------
    n : int
    mean_share_predicted : float
        Mean over inputs of ``b_c / y_c`` at the predicted class ``c``.
    median_share_predicted : float
    mean_abs_fraction : float
        Mean over inputs and classes of ``|b_k| / (|b_k| + |(A x)_k|)``, a bounded companion in [0, 1].
    per_class_mean_share : list of float, length n_out
        Mean of ``b_k / y_k`` over inputs predicted as ``k`` (None if none are).
    per_class_count : list of int
    accuracy : float or None
    """

    n: int
    mean_share_predicted: float
    median_share_predicted: float
    mean_abs_fraction: float
    per_class_mean_share: list[float | None] = field(default_factory=list)
    per_class_count: list[int] = field(default_factory=list)
    accuracy: float | None = None

    @classmethod
    def from_arrays(cls, logits: np.ndarray, bias: np.ndarray, labels: np.ndarray | None = None) -> DatasetBiasShare:
        pred = logits.argmax(axis=1)
        rows = np.arange(len(logits))
        share_pred = bias[rows, pred] / logits[rows, pred]
        lin = np.abs(logits - bias)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.abs(bias) / (np.abs(bias) + lin)
        per_mean, per_n = [], []
        for k in range(logits.shape[1]):
            sel = pred == k
            per_n.append(int(sel.sum()))
            per_mean.append(float(share_pred[sel].mean()) if sel.any() else None)
        return cls(
            n=len(logits),
            mean_share_predicted=float(np.mean(share_pred)),
            median_share_predicted=float(np.median(share_pred)),
            mean_abs_fraction=float(np.nanmean(frac)),
            per_class_mean_share=per_mean,
            per_class_count=per_n,
            accuracy=None if labels is None else float(np.mean(pred == labels)),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return json_safe(asdict(self))

    def figures(self) -> list[Any]:
        """One bar figure: mean bias share at the predicted class, per predicted class."""
        import plotly.graph_objects as go

        x = [str(k) for k in range(len(self.per_class_mean_share))]
        fig = go.Figure(go.Bar(x=x, y=self.per_class_mean_share, text=self.per_class_count))
        fig.update_layout(title=f"mean bias share b_c / y_c by predicted class (n={self.n}, "
                                f"overall {self.mean_share_predicted:.3f})",
                          xaxis_title="predicted class", yaxis_title="mean b_c / y_c", template="plotly_white")
        return [fig]
