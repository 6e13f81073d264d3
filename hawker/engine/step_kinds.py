"""Which rows of a step are decodes, and how consistent numerics keeps the two kinds apart.

Consistent numerics (``EngineConfig.consistent_numerics``, hawker/layers/matmul_plan.py)
needs a token's kernels to depend on its kind only: a prompt token always
takes the prefill kernels, a generated one the decode kernels, whatever else
shares its step. So a step's decodes and prefill chunks run as separate forwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from hawker.engine.scheduler import ScheduledSeq

# Decode keys are padded to a multiple of this many positions. SDPA's CPU
# kernel gives a query the same result for any such padding of its (masked)
# keys, but not for padding to an arbitrary length.
DECODE_KEY_MULTIPLE = 16
# Prefill queries attend on tiles of this many positions, aligned to its
# multiples: SDPA's CPU kernel blocks its work by the number of queries, so a
# query's result would otherwise depend on the length of its chunk.
CONSISTENT_PREFILL_TILE = 128


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
