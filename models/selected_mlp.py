"""Compute only chosen neurons of a gated MLP, so a patch source can skip most of its deepest block.

A patch source needs its deepest patched layer's activations for a few hundred neurons, not
that layer's whole MLP. In a gated MLP (Llama, Mistral, Qwen2, Gemma:
`down(act(gate(x)) * up(x))`) those neurons need only the matching rows of the gate and up
projections: two small matrix products instead of two full ones, and no down projection.

`SelectedMLP.build` checks this formula against the module itself on a random input and
declines (returns None) for any MLP it does not reproduce, so an architecture with another
MLP keeps the full path instead of getting wrong values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from neuronguard.models.sites import LayerSites

# Largest relative error accepted when checking the formula: float32 vs half precision.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
_HALF_TOLERANCE = 2e-2


@contextmanager
def _recorded_input(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first positional input of every call to `module`."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


class SelectedMLP:
    """act(x W_gate[idx]^T + b_gate[idx]) * (x W_up[idx]^T + b_up[idx]) for one layer's chosen neurons.

    Output columns follow `indices` order, the order a `Capture` records that layer in. The
    weight rows are copied when it is built: a later in-place edit of the weights needs a
    new one.
    """

    def __init__(self, sites: LayerSites, indices: torch.Tensor) -> None:
        assert sites.gate is not None and sites.up is not None and sites.mlp is not None
        self.mlp: nn.Module = sites.mlp
        self.down: nn.Module = sites.down
        self.act: Callable[[torch.Tensor], torch.Tensor] = sites.mlp.act_fn
        idx = indices.to(sites.gate.weight.device)
        self.gate_weight = sites.gate.weight.detach()[idx].contiguous()
        self.up_weight = sites.up.weight.detach()[idx].contiguous()
        self.gate_bias = None if sites.gate.bias is None else sites.gate.bias.detach()[idx].contiguous()
        self.up_bias = None if sites.up.bias is None else sites.up.bias.detach()[idx].contiguous()
        self.indices = indices

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_model] MLP input -> [..., k_layer] activations of the chosen neurons."""
        return self.act(F.linear(x, self.gate_weight, self.gate_bias)) * F.linear(x, self.up_weight, self.up_bias)

    @classmethod
    def build(cls, sites: LayerSites, indices: torch.Tensor) -> SelectedMLP | None:
        """The selected-neuron path for this layer, or None when its MLP is not a plain gated MLP."""
        gate, up, mlp = sites.gate, sites.up, sites.mlp
        if mlp is None or type(gate) is not nn.Linear or type(up) is not nn.Linear:
            return None  # exact types: quantised or fused replacements keep the full path
        if not callable(getattr(mlp, "act_fn", None)) or gate.weight.shape != up.weight.shape:
            return None
        if gate.weight.device.type == "meta":
            return None  # offloaded weights: nothing to slice
        if 2 * indices.numel() > gate.weight.shape[0]:
            return None  # most of the layer: the full MLP is as cheap, and copying its rows is not
        selected = cls(sites, indices)
        return selected if selected._reproduces_module() else None

    @torch.inference_mode()
    def _reproduces_module(self) -> bool:
        weight = self.gate_weight
        generator = torch.Generator(device=weight.device).manual_seed(0)
        x = torch.randn(1, 3, weight.shape[1], generator=generator, device=weight.device).to(weight.dtype)
        with _recorded_input(self.down) as seen:
            self.mlp(x)
        if len(seen) != 1 or seen[0].shape[:-1] != x.shape[:-1]:
            return False  # the down projection ran more or less than once, or on other positions
        expected = seen[0].index_select(-1, self.indices.to(x.device)).float()
        got = self(x).float()
        tolerance = _TOLERANCE.get(weight.dtype, _HALF_TOLERANCE)
        return bool(torch.allclose(got, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max())))
