"""Train-step time of the GPT presets: genjax against the lecture's PyTorch model.

    pip install -e '.[torch]'
    python -m experiments.benchmark_torch [--preset cpu|lecture] [--steps 40] [--repeats 3]
        [--torch-threads N]

The PyTorch side is the lecture's ``gpt.py`` model (A. Karpathy, "Let's build GPT", 2023:
a Python list of ``Head`` modules, ``nn.Linear``/``nn.Embedding`` weights from
normal(0, 0.02), zero biases) with the preset's optimizer (``torch.optim.AdamW`` with the
same learning rate, betas, eps and weight decay, on every parameter or on matrices only,
and the same gradient clipping). One step draws a batch as the lecture's ``get_batch``,
runs forward and backward and updates. The genjax side is the step that
``genjax.train.fit`` runs, measured by ``experiments.benchmark_scaling`` on the devices that
the experiment itself would use (on a CPU: one XLA device per core that divides the batch).
Both train on random tokens (vocabulary 65); each figure is the median of ``--repeats``
timings of ``--steps`` steps after warm-up steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Literal, Optional

import tyro


@dataclasses.dataclass(frozen=True)
class Args:
    """Time one training step of a GPT preset in genjax and in PyTorch."""

    preset: Literal["cpu", "lecture"] = "cpu"
    steps: int = 40
    """Timed steps per repeat."""
    repeats: int = 3
    torch_threads: Optional[int] = None
    """torch.set_num_threads (default: PyTorch's own choice, one per core)."""
    seed: int = 1337


def build_torch_gpt(config):
    """The lecture's ``GPTLanguageModel`` in PyTorch for a :class:`GPTConfig` (imports
    torch, the optional ``torch`` extra). ``model(idx, targets)`` returns ``(logits,
    loss)``, logits (B, T, V) float32, as the lecture."""
    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    n_embd, head_size = config.n_embd, config.head_size

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.key = nn.Linear(n_embd, head_size, bias=False)
            self.query = nn.Linear(n_embd, head_size, bias=False)
            self.value = nn.Linear(n_embd, head_size, bias=False)
            self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)))
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            B, T, C = x.shape
            k, q = self.key(x), self.query(x)                                 # (B, T, D)
            wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5               # (B, T, T)
            wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
            wei = self.dropout(F.softmax(wei, dim=-1))
            return wei @ self.value(x)                                        # (B, T, D)

    class MultiHeadAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([Head() for _ in range(config.n_head)])
            self.proj = nn.Linear(head_size * config.n_head, n_embd)
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            out = torch.cat([h(x) for h in self.heads], dim=-1)
            return self.dropout(self.proj(out))

    class FeedFoward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(),
                                     nn.Linear(4 * n_embd, n_embd), nn.Dropout(config.dropout))

        def forward(self, x):
            return self.net(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.sa, self.ffwd = MultiHeadAttention(), FeedFoward()
            self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

        def forward(self, x):
            x = x + self.sa(self.ln1(x))
            return x + self.ffwd(self.ln2(x))

    class GPTLanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding_table = nn.Embedding(config.vocab_size, n_embd)
            self.position_embedding_table = nn.Embedding(config.block_size, n_embd)
            self.blocks = nn.Sequential(*[Block() for _ in range(config.n_layer)])
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, config.vocab_size)
            self.apply(self._init_weights)

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

        def forward(self, idx, targets=None):
            B, T = idx.shape
            x = self.token_embedding_table(idx) + self.position_embedding_table(
                torch.arange(T, device=idx.device))
            logits = self.lm_head(self.ln_f(self.blocks(x)))                  # (B, T, V)
            if targets is None:
                return logits, None
            return logits, F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))

    return GPTLanguageModel()


def torch_optimizer(model, train):
    """``torch.optim.AdamW`` as a :class:`TrainConfig` asks (peak learning rate; decay on
    every parameter, or on tensors of 2+ dimensions only, as nanoGPT)."""
    import torch

    params = list(model.parameters())
    if train.weight_decay_on == "all":
        groups = [{"params": params, "weight_decay": train.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.beta1, train.beta2),
                             eps=train.eps)


def measure_torch(args: Args) -> dict:
    """Median step time of the lecture's PyTorch model with the preset."""
    import torch

    from experiments.gpt_shakespeare import PRESETS

    model_cfg, train = PRESETS[args.preset]
    model_cfg = dataclasses.replace(model_cfg, vocab_size=65)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    model = build_torch_gpt(model_cfg).to(device)
    opt = torch_optimizer(model, train)
    data = torch.randint(0, 65, (200_000,), device=device)
    B, T = train.batch_size, model_cfg.block_size

    def step():
        ix = torch.randint(len(data) - T, (B,), device=device)  # the lecture's get_batch
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + T + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        times.append((time.perf_counter() - t) / args.steps)
    step_s = statistics.median(times)
    return {"framework": f"torch {torch.__version__} ({device}, {torch.get_num_threads()} threads)",
            "step_ms": step_s * 1e3, "tokens_per_s": B * T / step_s}


def measure_genjax(args: Args) -> dict:
    """Median step time of genjax's fit step, in a fresh process with the devices that the
    experiment would use (see :func:`genjax.train.parallel.split_host_into_devices`).

    Raises:
      SystemExit: the measuring process failed (its stderr's tail is in the message).
    """
    from experiments.gpt_shakespeare import PRESETS

    batch = PRESETS[args.preset][1].batch_size
    code = (
        "import json, sys, jax\n"
        "from genjax.train.parallel import split_host_into_devices\n"
        f"split_host_into_devices({batch})\n"
        "from experiments.benchmark_scaling import Args, measure\n"
        "n = jax.device_count()\n"
        f"a = Args(devices=(n,), engines=('pmap' if n > 1 else 'none',), steps={args.steps}, "
        f"repeats={args.repeats}, preset={args.preset!r}, batch_size={batch})\n"
        "print('RESULT ' + json.dumps(measure(a, n)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), check=False)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"genjax measurement failed:\n{out.stderr[-3000:]}")
    row = json.loads(line[-1][7:])[0]
    import jax

    return {"framework": f"genjax (jax {jax.__version__}, {row['engine']} over {row['devices']} "
                         f"{row['platform']} device(s))",
            "step_ms": row["step_ms"], "tokens_per_s": row["tokens_per_s"]}


def main(argv=None):
    args = tyro.cli(Args, args=argv)
    rows = [measure_genjax(args), measure_torch(args)]
    print(f"\nGPT preset {args.preset}, {args.steps} steps x {args.repeats}, median")
    print("| framework | step (ms) | tokens/s |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['framework']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} |")
    return rows


if __name__ == "__main__":
    main()
