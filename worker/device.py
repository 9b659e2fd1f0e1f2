"""Device choice and the rule that CUDA is never initialised in a forked child."""

from __future__ import annotations

import os

import torch

_FORKED_CHILD = False


def _mark_forked_child() -> None:
    global _FORKED_CHILD
    _FORKED_CHILD = True


# A CUDA context does not survive fork(); a prefork pool child that touches CUDA crashes or hangs.
os.register_at_fork(after_in_child=_mark_forked_child)


class ForkedCudaError(RuntimeError):
    pass


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. Refuses CUDA in a forked child."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device.startswith("cuda") and _FORKED_CHILD:
        raise ForkedCudaError(
            "refusing to initialise CUDA in a forked process: run the worker with the threads or solo pool"
        )
    return device


def in_forked_child() -> bool:
    return _FORKED_CHILD
