"""The UNet's GroupNorm and LayerNorm kept in bf16 under bf16 autocast.

CUDA's autocast runs group_norm and layer_norm in fp32: each makes an fp32 copy of its bf16 input and returns fp32.
The backward pass then keeps those fp32 tensors (the GroupNorm its input, the SiLU after it its fp32 output) and a
separate bf16 copy for each layer that reads a norm's output (a LayerNorm feeds three attention projections, and
each casts it again). Run in bf16, the norm kernels still compute their statistics in fp32, and the next layer gets
the same values rounded to bf16 before rather than after a SiLU (or exactly the same, before a projection, which
autocast rounds to bf16 anyway). SD1.5 at 512 px, batch 8, on an H200: 19% less kept for the backward pass (2.17 GiB
less at the peak), and a step no slower (doc/PERFORMANCE.md, run K).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _in_bf16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and torch.is_autocast_enabled(x.device.type)


def _cast_like(parameter: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if parameter is None else parameter.to(x.dtype)


class Bf16GroupNorm(torch.nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _in_bf16(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, _cast_like(self.weight, x), _cast_like(self.bias, x), self.eps)


class Bf16LayerNorm(torch.nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _in_bf16(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, _cast_like(self.weight, x), _cast_like(self.bias, x),
                                self.eps)


def keep_norms_in_bf16(module: torch.nn.Module) -> None:
    """Gives every GroupNorm and LayerNorm of `module` the bf16 forward above; their weights, state_dict keys and
    checkpoints stay as they are, and without bf16 autocast they compute exactly as before."""
    for m in module.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = Bf16GroupNorm
        elif type(m) is torch.nn.LayerNorm:
            m.__class__ = Bf16LayerNorm
