"""Rebuild a channel-pruned model's skeleton from the tensor shapes in its file (no pickles)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def resize_to_state(model: nn.Module, shapes: Mapping[str, torch.Size | tuple[int, ...]]) -> nn.Module:
    """Shrink every conv, BatchNorm and linear layer of ``model`` in place to the given tensor shapes.

    Only shapes are read (``{state_dict key: shape}``), so a pruned model's file reloads into
    its original architecture without storing code. Values are left uninitialised.
    """
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        shape = shapes.get(f"{prefix}weight")
        if isinstance(m, nn.Conv2d) and shape is not None and tuple(shape) != tuple(m.weight.shape):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            m.out_channels = shape[0]
            m.groups = shape[0] if depthwise else m.groups
            m.in_channels = shape[1] * m.groups
            m.weight = nn.Parameter(torch.empty(tuple(shape)))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape[0]))
        elif isinstance(m, nn.Linear) and shape is not None and tuple(shape) != tuple(m.weight.shape):
            m.out_features, m.in_features = shape
            m.weight = nn.Parameter(torch.empty(tuple(shape)))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape[0]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            stats = shapes.get(f"{prefix}running_mean", shape)
            if stats is not None and stats[0] != m.num_features:
                n = stats[0]
                m.num_features = n
                if m.affine:
                    m.weight, m.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
                if m.track_running_stats:
                    m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
    return model
