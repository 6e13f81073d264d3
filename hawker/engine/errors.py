"""Errors shared by the engine and the runners it drives."""

from __future__ import annotations


class EngineFatalError(RuntimeError):
    """A failure after which no step can be trusted (the engine loop must stop)."""
