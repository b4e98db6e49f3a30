"""The mathematical trick in self-attention, printed as "Let's build GPT" shows it.

    python -m experiments.self_attention_trick [--seed S]

A lower-triangular matrix whose rows sum to one averages the rows before it (the toy 3x3
product first), and three ways to average the past of every position of x (B, T, C) =
(4, 8, 2) give the same result: a loop (version 1), a product with that matrix (version 2),
and a softmax over masked zero scores (version 3), the form self-attention makes data
dependent. The functions are :func:`genjax.models.gpt.average_past_loop`,
``average_past_matmul`` and ``average_past_softmax``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from genjax.models.gpt import average_past_loop, average_past_matmul, average_past_softmax
from genjax.train.cli import parse_args


@dataclasses.dataclass(frozen=True)
class Args:
    """Print the lecture's averaging of past tokens, three ways."""

    seed: int = 42
    """Seed of the random inputs."""


def main(argv=None) -> dict:
    """Print the toy product and the three versions; returns the arrays printed."""
    args = parse_args(Args, argv, "python -m experiments.self_attention_trick")
    key_b, key_x = jax.random.split(jax.random.PRNGKey(args.seed))
    np.set_printoptions(precision=4, suppress=True)

    # the toy example: a = rows of a lower-triangular matrix normalised to sum to 1
    a = jnp.tril(jnp.ones((3, 3)))
    a = a / a.sum(axis=1, keepdims=True)
    b = jax.random.randint(key_b, (3, 2), 0, 10).astype(jnp.float32)
    c = a @ b
    print(f"a=\n{np.asarray(a)}\n--\nb=\n{np.asarray(b)}\n--\nc=\n{np.asarray(c)}\n")

    B, T, C = 4, 8, 2
    x = jax.random.normal(key_x, (B, T, C))
    xbow = average_past_loop(x)       # version 1: for b, for t: mean of x[b, :t+1]
    xbow2 = average_past_matmul(x)    # version 2: wei = tril / row sums; wei @ x
    xbow3 = average_past_softmax(x)   # version 3: softmax of masked zeros; wei @ x
    wei = average_past_softmax(jnp.eye(T)[None])[0]  # its weights: the average of I's rows
    print(f"x[0]=\n{np.asarray(x[0])}\n--\nxbow[0] (version 1, a loop)=\n{np.asarray(xbow[0])}\n")
    print(f"wei (versions 2 and 3)=\n{np.asarray(wei)}\n")
    for name, other in (("version 2 (tril matmul)", xbow2), ("version 3 (masked softmax)", xbow3)):
        gap = float(jnp.max(jnp.abs(other - xbow)))
        print(f"{name} equals version 1: {bool(jnp.allclose(other, xbow, atol=1e-6))} "
              f"(largest difference {gap:.1e})")
    return {"a": a, "b": b, "c": c, "x": x, "xbow": xbow, "xbow2": xbow2, "xbow3": xbow3,
            "wei": wei}


if __name__ == "__main__":
    main()
