"""PyTorch: the float32 temporaries a thread keeps between calls of the fused loss."""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from .._typing import Array

_WORKSPACE_BYTES = 16 * 2**20
"""The most memory a thread keeps between calls for the temporaries of the blocks of rows (the
float32 copy of a float16/bfloat16 block, its log-probabilities, the gradient's first step, the
log-sum-exp's scratch): two float32 blocks of :data:`._torch_rows.BLOCK_ELEMENTS`."""

_WORKSPACE_VIEWS = 64
"""Views of the kept buffer remembered per thread (by shape, dtype and offset) at most."""


class _Workspace(threading.local):
    """This thread's kept buffer (bytes) for :func:`work`, and the views of it handed out."""

    def __init__(self) -> None:
        self.buffer: Array | None = None
        self.views: dict[tuple[Any, ...], Array] = {}


_WORKSPACE = _Workspace()
_inference_mode = torch.inference_mode


def work(shape: tuple[int, ...], dtype: Any, offset: int = 0) -> Array:
    """A CPU tensor of ``shape`` and ``dtype`` for temporaries that never leave the call: this
    thread's kept buffer from byte ``offset`` on where the whole request fits in
    ``_WORKSPACE_BYTES``, else a new tensor.

    A temporary of megabytes, allocated and freed at every call, is given back to the system by
    the C allocator (glibc trims the top of its heap or unmaps the block) and page-faults anew
    at the next call: on a virtual machine a fault costs about a microsecond per 4 KiB, which
    made a bfloat16 forward at 8 x 32000 take 0.64 ms instead of 0.07 ms in a fresh process.
    Kept, the buffer is written in cache at every call and faults once per thread, and only the
    pages a call writes become resident (small inputs hold a few KiB of it, not the cap). The
    view for a request is remembered (a training loop repeats its shapes), so a call costs a
    lookup.
    """
    workspace = _WORKSPACE
    key = (shape, dtype, offset)
    view = workspace.views.get(key)
    if view is not None:
        return view
    end = offset + math.prod(shape) * dtype.itemsize
    if end > _WORKSPACE_BYTES:
        return torch.empty(shape, dtype=dtype)
    # Made outside inference mode, whatever the caller's mode: an inference tensor (or a view
    # made in inference mode) could not be written in place by a later call in normal mode.
    with _inference_mode(False):
        if workspace.buffer is None:
            # The cap at once: one allocation per thread, whatever sizes come later.
            workspace.buffer = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8)
        view = workspace.buffer[offset:end].view(dtype).view(shape)
    if len(workspace.views) >= _WORKSPACE_VIEWS:
        workspace.views.clear()
    workspace.views[key] = view
    return view
