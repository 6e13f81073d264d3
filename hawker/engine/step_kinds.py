"""Which rows of a step are decodes, and how consistent numerics keeps the two kinds apart.

Consistent numerics (``EngineConfig.consistent_numerics``, hawker/layers/matmul_plan.py)
needs a token's kernels to depend on its kind only: a prompt token always
takes the prefill kernels, a generated one the decode kernels, whatever else
shares its step. So a step's decodes and prefill chunks run as separate forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from hawker.step import ScheduledSeq


def is_decode(seq: ScheduledSeq) -> bool:
    """One generated token. A prompt's one-token tail (after a prefix-cache hit) is a prefill chunk: it
    must take the prefill kernels, as it does when the whole prompt is computed."""
    return seq.num_tokens == 1 and seq.start_pos >= seq.num_prompt_tokens


def forward_groups(seqs: Sequence[ScheduledSeq], apart: bool) -> list[Sequence[ScheduledSeq]]:
    """The sequences of a step in the forwards that run them: all in one, or (``apart``) the decodes,
    then the prefill chunks."""
    if not apart:
        return [seqs]
    decodes = [s for s in seqs if is_decode(s)]
    prefills = [s for s in seqs if not is_decode(s)]
    return [group for group in (decodes, prefills) if group]
