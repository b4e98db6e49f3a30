"""What the twins share: copying arrays in, and the optimizer of a ``TrainConfig``."""

from __future__ import annotations

import numpy as np
import torch


def put(tensor: torch.Tensor, array) -> None:
    """Copy a genjax array (any layout already matched to ``tensor``'s) into ``tensor``.

    Raises:
      ValueError: the shapes differ, naming both.
    """
    value = torch.from_numpy(np.array(array, dtype=np.float32))
    if tuple(value.shape) != tuple(tensor.shape):
        raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(tensor.shape)}")
    with torch.no_grad():
        tensor.copy_(value)


def conv_weight(kernel) -> np.ndarray:
    """Flax ``nn.Conv`` kernel (kh, kw, in, out) -> ``nn.Conv2d`` weight (out, in, kh, kw)."""
    return np.asarray(kernel).transpose(3, 2, 0, 1)


def conv_transpose_weight(kernel) -> np.ndarray:
    """Flax ``nn.ConvTranspose(transpose_kernel=True)`` kernel (kh, kw, out, in) ->
    ``nn.ConvTranspose2d`` weight (in, out, kh, kw)."""
    return np.asarray(kernel).transpose(3, 2, 0, 1)


def dense_from_nhwc(kernel, height: int, width: int, channels: int) -> np.ndarray:
    """A Flax Dense kernel (H*W*C, out) that reads NHWC-flattened maps -> an ``nn.Linear``
    weight (out, C*H*W) that reads NCHW-flattened ones."""
    k = np.asarray(kernel).reshape(height, width, channels, -1)      # (H, W, C, out)
    return k.transpose(3, 2, 0, 1).reshape(k.shape[-1], -1)           # (out, C*H*W)


def dense_to_nhwc(kernel, bias, height: int, width: int, channels: int):
    """A Flax Dense (in, H*W*C) whose output is reshaped to NHWC maps -> the ``nn.Linear``
    weight (C*H*W, in) and bias whose output is viewed as NCHW maps."""
    k = np.asarray(kernel).reshape(-1, height, width, channels)      # (in, H, W, C)
    weight = k.transpose(3, 1, 2, 0).reshape(-1, k.shape[0])          # (C*H*W, in)
    b = None if bias is None else np.asarray(bias).reshape(height, width, channels)
    return weight, None if b is None else b.transpose(2, 0, 1).reshape(-1)


def make_optimizer(model: torch.nn.Module, train):
    """``torch.optim.AdamW`` as a genjax ``TrainConfig`` asks: peak learning rate, betas,
    eps, and the weight decay on every parameter or on tensors of 2+ dimensions only
    (nanoGPT's choice). (genjax's schedule and clipping are the step's, see
    :func:`clip`.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.weight_decay_on == "all":
        groups = [{"params": params, "weight_decay": train.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2),
                             eps=train.eps)


def clip(model: torch.nn.Module, train) -> None:
    """Clip gradients to ``train.grad_clip`` by global norm, when the config asks."""
    if train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
