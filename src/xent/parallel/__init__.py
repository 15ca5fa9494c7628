"""Cross-entropy with the classes split across workers (vocab / tensor parallelism).

:func:`cross_entropy` runs on every worker with its slice of the logits and returns the full
loss (:func:`linear_cross_entropy` with its rows of the projection, never making all of the
logits); the workers exchange O(rows) numbers through a :class:`Collectives` binding:

- :class:`TorchGroup` over ``torch.distributed`` (gloo, NCCL), differentiable by autograd;
- :class:`JaxAxis` over a named axis inside ``jax.shard_map`` or ``jax.pmap``, with ``jax.grad``.

The bindings are imported on first use, so ``import xent.parallel`` imports no framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._parallel import Collectives, cross_entropy, cross_entropy_and_grad
from .._parallel_linear import linear_cross_entropy, linear_cross_entropy_and_grad

if TYPE_CHECKING:
    from ..backends._collectives_jax import JaxAxis
    from ..backends._collectives_torch import TorchGroup

__all__ = [
    "Collectives",
    "JaxAxis",
    "TorchGroup",
    "cross_entropy",
    "cross_entropy_and_grad",
    "linear_cross_entropy",
    "linear_cross_entropy_and_grad",
]


def __getattr__(name: str) -> Any:
    if name == "TorchGroup":
        from ..backends._collectives_torch import TorchGroup

        return TorchGroup
    if name == "JaxAxis":
        from ..backends._collectives_jax import JaxAxis

        return JaxAxis
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
