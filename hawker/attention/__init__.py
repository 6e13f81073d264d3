"""Attention backends over the paged KV cache, behind one interface (``backend.py``).

``torch`` (``torch_metadata.py`` builds a step's metadata, ``torch_backend.py``
attends) runs everywhere and is the reference; ``triton``
(``triton_backend.py``) runs the kernels of ``hawker/kernels`` and is the
default on CUDA devices.
"""

from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_attention_backend(name: str, device: str) -> str:
    """``auto`` is triton on CUDA when triton is installed, else torch."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" and has_triton else "torch"
    if name == "triton" and not has_triton:
        raise ValueError("attention_backend='triton' needs the triton package")
    return name
