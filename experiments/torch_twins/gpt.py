"""The GPT in PyTorch: the lecture's model, and the same maths written for speed.

A. Karpathy, "Let's build GPT: from scratch, in code, spelled out" (2023), ``gpt.py``:
``LectureGPT`` is that model (a Python list of ``Head`` modules, normal(0, 0.02) weights,
zero biases). ``FastGPT`` computes the same function as a PyTorch expert writes it
(nanoGPT's ``CausalSelfAttention``): one fused q/k/v projection and
``F.scaled_dot_product_attention(is_causal=True)``. ``load_genjax`` copies a genjax GPT's
parameters into either, so all three compute the same logits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from experiments.torch_twins.common import put


def _init_weights(module):
    if isinstance(module, nn.Linear):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)


class _FeedForward(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class _LectureHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, D = config.n_embd, config.head_size
        self.key = nn.Linear(C, D, bias=False)
        self.query = nn.Linear(C, D, bias=False)
        self.value = nn.Linear(C, D, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        k, q = self.key(x), self.query(x)                                 # (B, T, D)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5               # (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = self.dropout(F.softmax(wei, dim=-1))
        return wei @ self.value(x)                                        # (B, T, D)


class _LectureAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = nn.ModuleList([_LectureHead(config) for _ in range(config.n_head)])
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(torch.cat([h(x) for h in self.heads], dim=-1)))


class _FastAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout_p = config.n_head, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q | k | v
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                             # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                  # (B, T, C)
        return self.dropout(self.proj(y))


class _Block(nn.Module):
    def __init__(self, config, attention):
        super().__init__()
        self.sa = attention(config)
        self.ffwd = _FeedForward(config.n_embd, config.dropout)
        self.ln1, self.ln2 = nn.LayerNorm(config.n_embd), nn.LayerNorm(config.n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class _GPT(nn.Module):
    attention = None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[_Block(config, self.attention) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(_init_weights)

    def forward(self, idx, targets=None):
        """``(logits (B, T, V) float32, mean cross-entropy or None)``, as the lecture."""
        B, T = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(
            torch.arange(T, device=idx.device))
        logits = self.lm_head(self.ln_f(self.blocks(x)))                  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))


class LectureGPT(_GPT):
    """The lecture's ``GPTLanguageModel`` for a :class:`genjax.models.gpt.GPTConfig`."""

    attention = _LectureAttention


class FastGPT(_GPT):
    """The same function with fused q/k/v and ``scaled_dot_product_attention``."""

    attention = _FastAttention


def load_genjax(model: _GPT, params) -> _GPT:
    """Copy a genjax GPT's parameters (``GPT.init_params``'s tree) into ``model``, a
    :class:`LectureGPT` or :class:`FastGPT` of the same config; returns it.

    Raises:
      ValueError: a shape that does not fit (another config).
    """
    C = model.config.n_embd
    put(model.token_embedding_table.weight, params["token_embedding_table"]["embedding"])
    put(model.position_embedding_table.weight, params["position_embedding_table"]["embedding"])
    for i, block in enumerate(model.blocks):
        p = params[f"blocks_{i}"]
        heads = p["sa"]["heads"]                                          # kernels (H, C, D)
        if isinstance(block.sa, _LectureAttention):
            for h, head in enumerate(block.sa.heads):
                for name in ("key", "query", "value"):
                    put(getattr(head, name).weight, heads[name]["kernel"][h].T)
        else:
            rows = [np.asarray(heads[name]["kernel"]).transpose(0, 2, 1).reshape(-1, C)
                    for name in ("query", "key", "value")]               # (H*D, C) each
            put(block.sa.qkv.weight, np.concatenate(rows))               # (3C, C): q | k | v
        put(block.sa.proj.weight, p["sa"]["proj"]["kernel"].T)
        put(block.sa.proj.bias, p["sa"]["proj"]["bias"])
        for j, dense in ((0, "Dense_0"), (2, "Dense_1")):
            put(block.ffwd.net[j].weight, p["ffwd"][dense]["kernel"].T)
            put(block.ffwd.net[j].bias, p["ffwd"][dense]["bias"])
        for name in ("ln1", "ln2"):
            put(getattr(block, name).weight, p[name]["scale"])
            put(getattr(block, name).bias, p[name]["bias"])
    put(model.ln_f.weight, params["ln_f"]["scale"])
    put(model.ln_f.bias, params["ln_f"]["bias"])
    put(model.lm_head.weight, params["lm_head"]["kernel"].T)
    put(model.lm_head.bias, params["lm_head"]["bias"])
    return model
