"""Train a small language-model head with ``xent.linear_cross_entropy``, on any backend.

    python examples/lm_head.py --backend torch|jax|numpy [--steps 300] [--vocab 512]

The corpus is generated here: a Markov chain over ``--vocab`` tokens in which every token is
followed by one of four successors (so the best possible loss is about ``log 4 = 1.386``). The
model embeds the previous token, mixes it through a tanh layer and projects it onto the
vocabulary; the loss of that projection is ``linear_cross_entropy(hidden, head, next_token)``,
which never forms the ``(tokens, vocab)`` logits. PyTorch and JAX differentiate it with their
autodiff; NumPy takes the loss and the gradients of ``hidden``, ``head`` and ``bias`` from
``linear_cross_entropy_and_grad`` and back-propagates the rest by hand. Every backend runs the
same plain gradient descent from the same initial weights.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import xent

SUCCESSORS = 4


def corpus(vocab: int, tokens: int, seed: int = 0) -> np.ndarray:
    """A token stream where each token is followed by one of its ``SUCCESSORS`` at random."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab, size=(vocab, SUCCESSORS))
    stream = np.empty(tokens, dtype=np.int64)
    stream[0] = 0
    picks = rng.integers(0, SUCCESSORS, size=tokens)
    for i in range(1, tokens):
        stream[i] = table[stream[i - 1], picks[i]]
    return stream


def initial(vocab: int, width: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.normal(size=(vocab, width)).astype(np.float32),
        "mix": (rng.normal(size=(width, width)) / math.sqrt(width)).astype(np.float32),
        "head": (rng.normal(size=(vocab, width)) * 0.1).astype(np.float32),
        "bias": np.zeros(vocab, dtype=np.float32),
    }


def train_torch(params: dict[str, np.ndarray], prev: np.ndarray, nxt: np.ndarray,
                steps: int, lr: float) -> list[float]:  # fmt: skip
    import torch

    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    x, y = torch.tensor(prev), torch.tensor(nxt)
    losses = []
    for _ in range(steps):
        hidden = torch.tanh(p["embed"][x] @ p["mix"])
        loss = xent.linear_cross_entropy(hidden, p["head"], y, bias=p["bias"], chunk_size=256)
        loss.backward()
        with torch.no_grad():
            for v in p.values():
                v -= lr * v.grad
                v.grad = None
        losses.append(float(loss))
    return losses


def train_jax(params: dict[str, np.ndarray], prev: np.ndarray, nxt: np.ndarray,
              steps: int, lr: float) -> list[float]:  # fmt: skip
    import jax
    import jax.numpy as jnp

    x, y = jnp.asarray(prev, dtype=jnp.int32), jnp.asarray(nxt, dtype=jnp.int32)

    def loss_fn(p: dict[str, Any]) -> Any:
        hidden = jnp.tanh(p["embed"][x] @ p["mix"])
        return xent.linear_cross_entropy(hidden, p["head"], y, bias=p["bias"], chunk_size=256)

    @jax.jit
    def step(p: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        return jax.tree.map(lambda v, g: v - lr * g, p, grads), loss

    p = {k: jnp.asarray(v) for k, v in params.items()}
    losses = []
    for _ in range(steps):
        p, loss = step(p)
        losses.append(float(loss))
    return losses


def train_numpy(params: dict[str, np.ndarray], prev: np.ndarray, nxt: np.ndarray,
                steps: int, lr: float) -> list[float]:  # fmt: skip
    p = {k: v.copy() for k, v in params.items()}
    losses = []
    for _ in range(steps):
        pre = p["embed"][prev] @ p["mix"]
        hidden = np.tanh(pre)
        loss, (d_hidden, d_head, d_bias) = xent.linear_cross_entropy_and_grad(
            hidden, p["head"], nxt, bias=p["bias"], chunk_size=256
        )
        d_pre = d_hidden * (1.0 - hidden**2)
        d_mix = p["embed"][prev].T @ d_pre
        d_embed = np.zeros_like(p["embed"])
        np.add.at(d_embed, prev, d_pre @ p["mix"].T)
        for name, g in (("embed", d_embed), ("mix", d_mix), ("head", d_head), ("bias", d_bias)):
            p[name] -= lr * g
        losses.append(float(loss))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax", "numpy"], default="numpy")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args()

    stream = corpus(args.vocab, args.tokens + 1)
    prev, nxt = stream[:-1], stream[1:]
    params = initial(args.vocab, args.width)
    train = {"torch": train_torch, "jax": train_jax, "numpy": train_numpy}[args.backend]
    losses = train(params, prev, nxt, args.steps, args.lr)
    print(f"{args.backend}: {args.steps} steps, vocab {args.vocab}, {args.tokens} tokens")
    print(f"initial train loss {losses[0]:.4f}")
    print(
        f"final train loss {losses[-1]:.4f} (floor log {SUCCESSORS} = {math.log(SUCCESSORS):.4f})"
    )


if __name__ == "__main__":
    main()
