"""The attack view of a model: its eval-mode function with every conv->BatchNorm pair folded into one conv.

In eval mode a BatchNorm that directly follows a convolution is an affine map, so PGD (which always
runs the model in eval mode) can differentiate a view whose conv->BN pairs are single convolutions and
whose other BatchNorms are ``x * scale + shift``. The folded weights are read live from the model on
every call, so the view never goes stale as the model trains; logits agree with the eval-mode model to
float rounding, and the BatchNorm forward/backward passes, which dominate eval-mode backward on CPU,
disappear (``benchmarks/bench.py`` measures it). ``FOLD_BN = False`` turns it off.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch import Tensor

from models.normalize import NormalizedModel

__all__ = ["FOLD_BN", "attack_view"]

FOLD_BN = True


class _FoldedConvBN(nn.Module):
    """``bn(conv(x))`` for an eval-mode BatchNorm as one convolution; weights are folded on every call."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        with torch.no_grad():  # the attack differentiates w.r.t. the input only
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            w = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
            b = shift if conv.bias is None else conv.bias * scale + shift
        return conv._conv_forward(x, w, b.to(w.dtype))


class _EvalBN(nn.Module):
    """An eval-mode BatchNorm2d that no conv precedes, as ``x * scale + shift`` (cheaper to differentiate on CPU)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        return torch.addcmul(shift.view(1, -1, 1, 1).to(x.dtype), x, scale.view(1, -1, 1, 1).to(x.dtype))


class _AttackView(nn.Module):
    """The eval-mode function of a ``NormalizedModel`` with conv->BN folded; shares every module with it."""

    def __init__(self, model: nn.Module, net: nn.Module):
        super().__init__()
        self._model = weakref.ref(model)  # weak: the cache below must not keep the model alive
        self.normalize, self.net = model.normalize, net

    def forward(self, x: Tensor) -> Tensor:
        model = self._model()
        dtype = getattr(model, "amp_dtype", None) if model is not None else None
        if dtype is None:
            return self.net(self.normalize(x))
        with torch.autocast(x.device.type, dtype=dtype):
            out = self.net(self.normalize(x))
        return out.float()


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, nn.Module | None]" = weakref.WeakKeyDictionary()


def _fold(model: nn.Module) -> nn.Module | None:
    """Trace ``model.net`` with torch.fx and fold each conv whose only user is an eval-usable BatchNorm2d."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model.net)
    except Exception:  # not traceable: attack the model itself
        return None
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        bn = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None or len(node.args) != 1:
            continue
        prev = node.args[0]
        conv = mods.get(prev.target) if isinstance(prev, fx.Node) and prev.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(prev.users) != 1 or conv.padding_mode != "zeros":
            name = f"affine_{folded}"  # a BatchNorm no conv precedes (pre-activation blocks): an affine map
            gm.add_submodule(name, _EvalBN(bn))
            node.target = name
            folded += 1
            continue
        name = f"folded_{folded}"
        gm.add_submodule(name, _FoldedConvBN(conv, bn))
        with gm.graph.inserting_after(prev):
            new = gm.graph.call_module(name, prev.args, prev.kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(prev)
        folded += 1
    if not folded:
        return None
    gm.graph.lint()
    gm.recompile()
    return _AttackView(model, gm)


def attack_view(model: nn.Module) -> nn.Module:
    """The module PGD differentiates: for a ``NormalizedModel`` with conv->BN pairs, a cached folded view
    (valid in eval mode only, which is how the attack runs it); otherwise ``model`` itself."""
    # also for a --compile'd model: the view runs eagerly (faster under input gradients than a compiled
    # forward on CPU: benchmarks/bench.py)
    if not FOLD_BN or not isinstance(model, NormalizedModel):
        return model
    if model not in _VIEWS:
        _VIEWS[model] = _fold(model)
    view = _VIEWS[model]
    return view if view is not None else model
