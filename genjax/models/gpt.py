"""The character-level GPT of "Let's build GPT: from scratch, in code, spelled out".

A. Karpathy, 2023 (https://github.com/karpathy/ng-video-lecture, ``gpt.py``), after
A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017. The classes below follow the
lecture top to bottom: a bigram baseline, the averaging of past tokens self-attention
grows from (three forms), one causal self-attention ``Head``, several heads in parallel,
the feed-forward layer, the pre-LayerNorm residual ``Block`` and the ``GPT``, which also
builds each intermediate model of the lecture (``GPTConfig.stage``).

Shapes in comments: B batch, T time (sequence position), C channels (``n_embd``),
H heads, D head size (``n_embd // n_head``), V vocabulary.

Where Flax and PyTorch defaults differ, the lecture's are used: LayerNorm epsilon 1e-5,
Dense/Embed weights drawn from normal(0, 0.02), zero biases.

Two ways to compute the same attention from the same parameters (``GPT(config,
attention=...)``): ``heads``, the lecture's heads as one batched computation, and ``fused``,
one q/k/v product and ``jax.nn.dot_product_attention`` (cuDNN's fused kernel on a GPU in
bfloat16, else XLA's); ``auto`` picks per backend (``heads`` on the CPU, where XLA runs it faster).
``GPTConfig.dtype`` ``bfloat16`` is mixed precision: float32 parameters and residual
stream, bfloat16 products in the blocks, float32 LayerNorm statistics, softmax and
``lm_head`` (the logits).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

# The lecture repository's final init (``_init_weights``): N(0, 0.02) weights, zero biases.
_weight_init = nn.initializers.normal(stddev=0.02)
# Before it, the lecture's models kept PyTorch's defaults (``init_scheme="torch"``): nn.Embedding
# N(0, 1); nn.Linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
INITS = ("lecture", "torch")


def _uniform_fan_in(fan_in: int):
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                    -bound, bound)


def _dense(features: int, fan_in: int, init: str, **kwargs) -> nn.Dense:
    """``nn.Dense`` initialised as ``init`` says (``lecture``: N(0, 0.02) kernel, zero bias;
    ``torch``: ``torch.nn.Linear``'s defaults for ``fan_in`` inputs)."""
    if init not in INITS:
        raise ValueError(f"init_scheme must be one of {INITS}, got {init!r}")
    if init == "torch":
        return nn.Dense(features, kernel_init=_uniform_fan_in(fan_in),
                        bias_init=_uniform_fan_in(fan_in), **kwargs)
    return nn.Dense(features, kernel_init=_weight_init, **kwargs)


def _embed(num: int, features: int, init: str, name: str) -> nn.Embed:
    """``nn.Embed`` initialised N(0, 0.02) (``lecture``) or N(0, 1) (``torch``)."""
    return nn.Embed(num, features, name=name, embedding_init=nn.initializers.normal(
        stddev=1.0 if init == "torch" else 0.02))
_LN_EPS = 1e-5  # torch.nn.LayerNorm's default; Flax's is 1e-6.


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of :class:`GPT` (names as in the lecture and nanoGPT).

    Attributes:
      vocab_size: number of distinct tokens V (65 for Tiny Shakespeare's characters).
      block_size: maximum context length T, in tokens.
      n_layer: number of transformer blocks.
      n_head: attention heads per block; must divide ``n_embd``.
      n_embd: embedding width C.
      dropout: dropout probability in [0, 1), used only when ``deterministic=False``.
      dtype: the products' dtype: ``float32``, or ``bfloat16`` for mixed precision (the
        parameters, the residual stream, LayerNorm statistics, softmax and logits stay
        float32). Not part of the checkpoint: a run may resume in the other dtype.
      stage: the model of a stage of the lecture (:data:`STAGES`), ``full`` (default) the
        final one. ``bigram``: a (V, V) table of next-token logits (uses ``vocab_size``
        only). ``head``: token and position embeddings, one self-attention head of size C,
        ``lm_head``. ``multihead``: ``n_head`` heads of size C / ``n_head``, concatenated,
        not projected. ``ffwd``: then a C -> C ReLU layer. ``residual``: ``n_layer``
        residual blocks (projected heads, C -> 4C -> C feed-forward), no LayerNorm.
        ``layernorm``: pre-LayerNorm blocks and a final LayerNorm. ``full``: with dropout,
        :class:`GPT` as the lecture ends. The stages before ``full`` have no dropout in
        the lecture; ``dropout`` applies where a later stage has it. Attention scores are
        scaled by ``head_size ** -0.5`` at every stage, as the lecture's repository (the
        video's first version scaled by ``n_embd ** -0.5``, a slip it corrects).

    Raises:
      ValueError: on a non-positive size, ``n_embd`` not divisible by ``n_head``, a
        dropout outside [0, 1), an unknown dtype or stage, naming the bad value.
    """

    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    dtype: Literal["float32", "bfloat16"] = "float32"
    stage: Literal["bigram", "head", "multihead", "ffwd", "residual", "layernorm",
                   "full"] = "full"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                f"choose n_head among the divisors of {self.n_embd}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self):
        return COMPUTE_DTYPES[self.dtype]

    @property
    def init(self) -> str:
        """``lecture`` (N(0, 0.02), the lecture's final ``gpt.py``) for the full model;
        ``torch`` (PyTorch's default initialisation, as the lecture's models had until
        then) for the earlier stages."""
        return "lecture" if self.stage == "full" else "torch"


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The lecture's models in the order it builds them (GPTConfig.stage).
STAGES = ("bigram", "head", "multihead", "ffwd", "residual", "layernorm", "full")
ATTENTION_IMPLEMENTATIONS = ("auto", "heads", "fused")


def resolve_attention(attention: str) -> str:
    """``heads`` or ``fused`` for ``attention`` (``auto``: ``heads`` on the CPU backend,
    ``fused`` on GPUs and TPUs).

    Raises:
      ValueError: an ``attention`` outside ``auto``, ``heads``, ``fused``.
    """
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
    if attention == "auto":
        return "heads" if jax.default_backend() == "cpu" else "fused"
    return attention


class BigramLanguageModel(nn.Module):
    """The lecture's baseline: each token reads the logits of the next one from a table.

    ``__call__(idx)`` maps int32 token ids (B, T) to float32 logits (B, T, V).
    """

    vocab_size: int
    init_scheme: str = "lecture"  # or "torch": N(0, 1), as the lecture's bigram.py

    @nn.compact
    def __call__(self, idx, deterministic: bool = True):
        del deterministic  # no dropout in the bigram model; kept for a common interface
        table = _embed(self.vocab_size, self.vocab_size, self.init_scheme,
                       "token_embedding_table")
        return table(idx).astype(jnp.float32)  # (B, T, V)


# --- The mathematical trick in self-attention: each position averages the past. ----------
# Three ways the lecture writes xbow[b, t] = mean(x[b, :t + 1]); all take x (B, T, C) float
# and return (B, T, C). The third is the form self-attention generalises: the zeros become
# data-dependent scores (Head, below).


def average_past_loop(x):
    """Version 1: a loop over batch rows and positions, as the lecture writes it first.
    x: (B, T, C) float -> (B, T, C), row t the mean of rows 0..t."""
    B, T, C = x.shape
    return jnp.stack([jnp.stack([x[b, :t + 1].mean(axis=0) for t in range(T)])  # (T, C)
                      for b in range(B)])                                         # (B, T, C)


def average_past_matmul(x):
    """Version 2: one product with a lower-triangular matrix whose rows sum to 1.
    x: (..., T, C) float -> the same shape."""
    T = x.shape[-2]
    wei = jnp.tril(jnp.ones((T, T), x.dtype))      # (T, T)
    wei = wei / wei.sum(axis=1, keepdims=True)     # row t: 1/(t+1) on positions 0..t
    return wei @ x                                 # (T, T) @ (B, T, C) -> (B, T, C)


def average_past_softmax(x):
    """Version 3: zero scores, the future masked to -inf, a softmax over each row.
    x: (..., T, C) float -> the same shape."""
    T = x.shape[-2]
    tril = jnp.tril(jnp.ones((T, T), dtype=bool))
    wei = jnp.where(tril, 0.0, -jnp.inf)           # (T, T): affinities, none yet
    wei = jax.nn.softmax(wei, axis=-1)             # the same averages as version 2
    return wei.astype(x.dtype) @ x                 # (B, T, C)


class Head(nn.Module):
    """One head of causal self-attention.

    Input x (B, T, C); output (B, T, D) in ``dtype``. Scores are scaled by D^-0.5, positions
    may attend only to themselves and earlier ones (lower-triangular mask), the softmax is
    taken in float32, and dropout is applied to the attention weights.
    """

    head_size: int
    dropout: float
    dtype: jnp.dtype = jnp.float32
    init_scheme: str = "lecture"  # see INITS

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        B, T, C = x.shape
        dense = functools.partial(_dense, self.head_size, C, self.init_scheme, use_bias=False,
                                  dtype=self.dtype)
        k = dense(name="key")(x)    # (B, T, D)
        q = dense(name="query")(x)  # (B, T, D)
        v = dense(name="value")(x)  # (B, T, D)
        wei = q @ k.swapaxes(-2, -1) * self.head_size ** -0.5  # (B, T, T)
        tril = jnp.tril(jnp.ones((T, T), dtype=bool))
        wei = jnp.where(tril, wei.astype(jnp.float32), -jnp.inf)
        wei = jax.nn.softmax(wei, axis=-1)
        wei = nn.Dropout(self.dropout)(wei, deterministic=deterministic)
        return wei.astype(self.dtype) @ v  # (B, T, T) @ (B, T, D) -> (B, T, D)


class _HeadKernel(nn.Module):
    """The (H, C, D) kernel of one of query/key/value, as :class:`MultiHeadAttention`'s
    batched heads store it (for its fused computation)."""

    shape: tuple
    init_scheme: str = "lecture"

    @nn.compact
    def __call__(self):
        C = self.shape[1]  # (H, C, D): each head's fan-in is C
        init = _uniform_fan_in(C) if self.init_scheme == "torch" else _weight_init
        return self.param("kernel", init, self.shape, jnp.float32)


class _QKVKernels(nn.Module):
    """The batched heads' query, key and value kernels, stacked: (3, H, C, D)."""

    shape: tuple
    init_scheme: str = "lecture"

    @nn.compact
    def __call__(self):
        return jnp.stack([_HeadKernel(self.shape, self.init_scheme, name=n)()
                          for n in ("query", "key", "value")])


class MultiHeadAttention(nn.Module):
    """``n_head`` :class:`Head` s in parallel, concatenated, then projected back to C.

    The heads are one batched computation (``nn.vmap`` over a leading head axis of the
    parameters: each of key/query/value is a (H, C, D) kernel), the same maths as the
    lecture's Python list of heads. Every head draws its own dropout mask.

    ``attention="fused"`` computes the same from the same parameters: one (C, 3HD) product
    for q, k and v of all heads, then ``jax.nn.dot_product_attention(is_causal=True)``
    (cuDNN's kernel on a GPU in bfloat16, else XLA's: :func:`_fused_attention`), or with dropout
    active the explicit softmax with one dropout draw for all heads (the masks differ from
    ``heads``', their distribution does not). Input (B, T, C) -> output (B, T, C) in
    ``dtype`` (with ``project=False``, the concatenated heads (B, T, H * D), no dropout).
    """

    n_head: int
    head_size: int
    dropout: float
    dtype: jnp.dtype = jnp.float32
    attention: str = "heads"
    project: bool = True  # False: the heads concatenated only (the lecture's "multihead")
    init_scheme: str = "lecture"  # see INITS

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        B, T, C = x.shape
        H, D = self.n_head, self.head_size
        if resolve_attention(self.attention) == "heads":
            heads = nn.vmap(
                Head,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(None, None),
                out_axes=2,
                axis_size=H,
            )(D, self.dropout, self.dtype, self.init_scheme, name="heads")
            out = heads(x, deterministic)                 # (B, T, H, D)
        else:
            out = self._fused(x, deterministic)            # (B, T, H, D)
        out = out.reshape(B, T, H * D)  # concat over heads: (B, T, HD)
        if not self.project:
            return out
        out = _dense(C, H * D, self.init_scheme, dtype=self.dtype, name="proj")(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)

    def _fused(self, x, deterministic):
        H, D = self.n_head, self.head_size
        B, T, C = x.shape
        # The vmapped heads' parameters, heads/{query,key,value}/kernel, each (H, C, D).
        w = _QKVKernels((H, C, D), self.init_scheme, name="heads")()    # (3, H, C, D)
        w = w.transpose(2, 0, 1, 3).reshape(C, 3 * H * D)                # (C, 3HD)
        qkv = x.astype(self.dtype) @ w.astype(self.dtype)                # (B, T, 3HD)
        q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 1, 3, 4)    # 3 x (B, T, H, D)
        if deterministic or self.dropout == 0:
            return _fused_attention(q, k, v)                              # (B, T, H, D)
        wei = jnp.einsum("bthd,bshd->bhts", q, k) * D ** -0.5            # (B, H, T, T)
        tril = jnp.tril(jnp.ones((T, T), dtype=bool))
        wei = jax.nn.softmax(jnp.where(tril, wei.astype(jnp.float32), -jnp.inf), axis=-1)
        wei = nn.Dropout(self.dropout)(wei, deterministic=False)
        return jnp.einsum("bhts,bshd->bthd", wei.astype(self.dtype), v)  # (B, T, H, D)


def _fused_attention(q, k, v):
    """Causal ``jax.nn.dot_product_attention`` of (B, T, H, D) q, k, v: cuDNN's fused
    kernel on a GPU for bfloat16/float16 with a head size it takes (a multiple of 8, at most
    128), else XLA's (JAX itself picks XLA when no implementation is named)."""
    D = q.shape[-1]
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) \
            and D % 8 == 0 and D <= 128:
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # no usable cuDNN here
            pass
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


class FeedForward(nn.Module):
    """Position-wise MLP: C -> 4C -> ReLU -> C, then dropout. (B, T, C) -> (B, T, C).

    ``project=False`` is the lecture's first feed-forward layer (its ``ffwd`` stage):
    C -> C -> ReLU, no second layer, no dropout."""

    n_embd: int
    dropout: float
    dtype: jnp.dtype = jnp.float32
    project: bool = True
    init_scheme: str = "lecture"  # see INITS

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        C = self.n_embd
        dense = functools.partial(_dense, init=self.init_scheme, dtype=self.dtype)
        if not self.project:
            return nn.relu(dense(C, C)(x))  # (B, T, C)
        x = dense(4 * C, C)(x)          # (B, T, 4C)
        x = nn.relu(x)
        x = dense(C, 4 * C)(x)          # (B, T, C)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class Block(nn.Module):
    """Transformer block, pre-LayerNorm: x + sa(ln1(x)), then x + ffwd(ln2(x)). The
    residual stream x (B, T, C) stays float32; LayerNorm takes its statistics in float32.
    At the lecture's ``residual`` stage (``config.stage``), without the LayerNorms."""

    config: GPTConfig
    attention: str = "heads"

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg, dtype = self.config, self.config.compute_dtype
        sa = MultiHeadAttention(cfg.n_head, cfg.head_size, cfg.dropout, dtype, self.attention,
                                init_scheme=cfg.init, name="sa")
        ffwd = FeedForward(cfg.n_embd, cfg.dropout, dtype, init_scheme=cfg.init, name="ffwd")
        ln = functools.partial(nn.LayerNorm, epsilon=_LN_EPS, dtype=dtype)
        if cfg.stage == "residual":  # the lecture adds the LayerNorms at the next stage
            ln = lambda name: (lambda x: x)
        x = x + sa(ln(name="ln1")(x), deterministic)    # (B, T, C)
        x = x + ffwd(ln(name="ln2")(x), deterministic)  # (B, T, C)
        return x


class GPT(nn.Module):
    """The lecture's GPT language model, or with ``config.stage`` one of the models it
    builds on the way (:class:`GPTConfig`).

    ``apply({'params': p}, idx, deterministic)``: int32 token ids ``idx`` (B, T) with
    T <= block_size give float32 logits (B, T, V). With ``deterministic=False`` dropout is
    on and the call needs a ``'dropout'`` PRNG key (``rngs={'dropout': key}``).
    ``attention``: ``auto`` (default), ``heads`` or ``fused``, the same maths and
    parameters (:class:`MultiHeadAttention`).

    Raises:
      ValueError: if T exceeds ``block_size`` (at trace time); an unknown ``attention``.
    """

    config: GPTConfig
    attention: str = "auto"

    @nn.compact
    def __call__(self, idx, deterministic: bool = True):
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={cfg.block_size}")
        attention = resolve_attention(self.attention)
        init = cfg.init
        if cfg.stage == "bigram":
            return BigramLanguageModel(cfg.vocab_size, init, name="bigram")(idx)  # (B, T, V)
        dtype, C = cfg.compute_dtype, cfg.n_embd
        tok_emb = _embed(cfg.vocab_size, C, init, "token_embedding_table")(idx)    # (B, T, C)
        pos_emb = _embed(cfg.block_size, C, init, "position_embedding_table")(jnp.arange(T))
        x = tok_emb + pos_emb                                                      # (B, T, C)
        if cfg.stage == "head":  # one head, of size C
            x = Head(C, 0.0, dtype, init, name="sa_head")(x, deterministic)        # (B, T, C)
        elif cfg.stage in ("multihead", "ffwd"):  # H heads of size C / H, concatenated
            x = MultiHeadAttention(cfg.n_head, cfg.head_size, 0.0, dtype, attention,
                                   project=False, init_scheme=init,
                                   name="sa_heads")(x, deterministic)              # (B, T, C)
            if cfg.stage == "ffwd":  # then each position thinks on what it gathered
                x = FeedForward(C, 0.0, dtype, project=False, init_scheme=init,
                                name="ffwd")(x)                                    # (B, T, C)
        else:  # residual, layernorm, full: the blocks
            for i in range(cfg.n_layer):
                x = Block(cfg, attention, name=f"blocks_{i}")(x, deterministic)    # (B, T, C)
            if cfg.stage != "residual":
                x = nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, name="ln_f")(x)      # (B, T, C)
        logits = _dense(cfg.vocab_size, C, init, dtype=jnp.float32,
                        name="lm_head")(x)                  # (B, T, V), float32 in any dtype
        return logits.astype(jnp.float32)

    def init_params(self, key: jax.Array):
        """Fresh parameters (a pytree of float32 arrays) drawn with ``key`` (compiled once
        per config; usable inside ``jax.jit`` and ``jax.eval_shape``)."""
        return _init_params(self.config, key)

    def generate(self, params, prompt_ids, max_new_tokens: int, key: jax.Array,
                 temperature: float = 1.0, top_k: Optional[int] = None, start_id: int = 0):
        """Autoregressive sampling, as the lecture's ``generate``; see :func:`generate`."""
        return generate(self.config, params, prompt_ids, max_new_tokens, key,
                        temperature=temperature, top_k=top_k, start_id=start_id)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: GPTConfig, key: jax.Array):
    idx = jnp.zeros((1, config.block_size), jnp.int32)
    # Drawn by the heads path whatever the backend: the same seed gives the same parameters.
    return GPT(config, attention="heads", parent=None).init({"params": key}, idx)["params"]


def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def cross_entropy_loss(logits, targets):
    """Mean next-token cross-entropy in nats (float32 scalar).

    Args:
      logits: (B, T, V) float.
      targets: (B, T) int32 ids in [0, V).
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return nll.mean()


def generate(config: GPTConfig, params, prompt_ids, max_new_tokens: int, key: jax.Array,
             temperature: float = 1.0, top_k: Optional[int] = None, start_id: int = 0):
    """Sample ``max_new_tokens`` tokens after ``prompt_ids``, one compiled program.

    At each step the context is cropped to its last ``block_size`` tokens, the logits at
    the last position are divided by ``temperature``, optionally restricted to the
    ``top_k`` largest, and a token is drawn from the softmax with ``fold_in(key, step)``.
    The loop is a ``lax.fori_loop`` inside one ``jax.jit`` (compiled once per prompt
    length, ``max_new_tokens`` and ``top_k``; no retracing per token).

    Args:
      config: the model's :class:`GPTConfig`.
      params: the GPT parameters.
      prompt_ids: int token ids, shape (T0,) or (B, T0). T0 may exceed ``block_size``;
        T0 = 0 starts from ``start_id`` (the lecture starts from id 0, the newline of the
        Tiny Shakespeare vocabulary), which is then part of the output.
      max_new_tokens: number of tokens to add, >= 0.
      key: PRNG key; the same key gives the same text.
      temperature: >= 0; 0 means greedy decoding (argmax).
      top_k: keep the k most likely tokens; values above V are clamped to V. None: all.
      start_id: the token that starts an empty prompt.

    Returns:
      int32 ids of shape (T0 + max_new_tokens,) or (B, T0 + max_new_tokens): the prompt
      followed by the new tokens.

    Raises:
      ValueError: negative or nan temperature, ``max_new_tokens < 0``, ``top_k < 1``, ids outside
        [0, V), or a prompt of rank other than 1 or 2.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also refuses nan
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        top_k = min(int(top_k), config.vocab_size)
    prompt = jnp.asarray(prompt_ids, dtype=jnp.int32)
    if prompt.ndim not in (1, 2):
        raise ValueError(f"prompt_ids must have shape (T,) or (B, T), got {prompt.shape}")
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if prompt.shape[1] == 0:
        if not 0 <= start_id < config.vocab_size:
            raise ValueError(f"start_id {start_id} outside the vocabulary [0, {config.vocab_size})")
        prompt = jnp.full((prompt.shape[0], 1), start_id, jnp.int32)
    if prompt.size and (int(prompt.min()) < 0 or int(prompt.max()) >= config.vocab_size):
        raise ValueError(
            f"prompt ids must lie in [0, {config.vocab_size}), got range "
            f"[{int(prompt.min())}, {int(prompt.max())}]")
    out = _generate_jit(config, params, prompt, key, jnp.float32(temperature),
                        max_new_tokens, top_k)
    return out[0] if squeeze else out


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _generate_jit(config, params, prompt, key, temperature, max_new_tokens, top_k):
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    # One buffer holds prompt and new tokens; it is at least block_size long so that the
    # window below is always a full, in-bounds slice.
    buf = jnp.zeros((B, max(total, config.block_size)), jnp.int32)
    buf = buf.at[:, :T0].set(prompt)
    model = GPT(config, parent=None)  # may be traced from inside GPT.generate

    def body(i, buf):
        length = T0 + i                                       # tokens so far
        start = jnp.maximum(length - config.block_size, 0)     # crop to the last block_size
        window = jax.lax.dynamic_slice_in_dim(buf, start, config.block_size, axis=1)  # (B, T)
        logits = model.apply({"params": params}, window)      # (B, T, V)
        # Causality makes the padding after position `length - 1` irrelevant.
        logits = jax.lax.dynamic_index_in_dim(logits, length - 1 - start, axis=1,
                                              keepdims=False)  # (B, V)
        if top_k is not None and top_k < config.vocab_size:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]     # (B, 1)
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        greedy = jnp.argmax(logits, axis=-1)
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        sampled = jax.random.categorical(jax.random.fold_in(key, i), logits / safe_t, axis=-1)
        nxt = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)  # (B,)
        return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], length, axis=1)

    buf = jax.lax.fori_loop(0, max_new_tokens, body, buf)
    return buf[:, :total]


# --- The language-modelling loss. ----------------------------------------------------------


def make_loss_fn(model: nn.Module):
    """``(params, (x, y), key, train) -> (loss, {})``: mean next-token cross-entropy of
    ``model`` (a :class:`GPT` or :class:`BigramLanguageModel`), dropout keyed by ``key``
    when ``train``."""

    def loss_fn(params, batch, key, train):
        x, y = batch
        logits = model.apply({"params": params}, x, deterministic=not train,
                             rngs={"dropout": key} if train else None)
        return cross_entropy_loss(logits, y), {}

    return loss_fn
