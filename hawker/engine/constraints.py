"""The engine's side of structured outputs: a matcher for each constrained sequence, and each step's masks.

Compiling is ``GrammarCompiler``'s (hawker/structured/grammars.py, cached and time-limited); the masks of
a step are filled on one worker thread while the forward pass runs (hawker/structured/masks.py). A
reasoning model's constraint waits for the end of its thinking (``</think>``).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transformers import PreTrainedTokenizerBase

from hawker.engine.request import Request
from hawker.sampling_params import SamplingParams
from hawker.step import ScheduledSeq
from hawker.structured.grammars import GrammarCompiler, SequenceGrammar
from hawker.structured.masks import MaskStats, StepMasks

REASONING_END = "</think>"
REASONING_TAIL_TOKENS = 16  # prompt tokens looked at for a closed think block


class Constraints:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_token_id: int | None,
        compile_timeout_s: float,
        reasoning_parser: str | None,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.grammars = GrammarCompiler(tokenizer, vocab_size, eos_token_id, compile_timeout_s)
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="hawker-masks")  # fills masks during forwards
        self.mask_stats = MaskStats()
        # The token ids that end a reasoning model's thinking, after which its output constraint applies.
        self._reasoning_end: tuple[int, ...] | None = None
        if reasoning_parser is not None:
            self._reasoning_end = tuple(tokenizer.encode(REASONING_END, add_special_tokens=False))

    def grammar(self, params: SamplingParams, prompt_ids: list[int], new_request: bool) -> SequenceGrammar | None:
        """A fresh matcher of the request's constraint (None: unconstrained); ``new_request``: count it once."""
        constraint = params.structured_outputs
        if constraint is None:
            return None
        return self.grammars.matcher(constraint, new_request, self._starts_after(prompt_ids))

    def _starts_after(self, prompt_ids: list[int]) -> tuple[int, ...] | None:
        """A reasoning model's constraint waits for the end of its thinking (``</think>``), unless the prompt
        already closed it (a chat template that turns thinking off writes an empty block)."""
        if self._reasoning_end is None:
            return None
        tail = str(self._tokenizer.decode(prompt_ids[-REASONING_TAIL_TOKENS:]))
        return None if tail.rstrip().endswith(REASONING_END) else self._reasoning_end

    def step_masks(self, seqs: tuple[ScheduledSeq, ...], requests: Mapping[str, Request]) -> StepMasks | None:
        """The masks of the constrained sequences that sample, filled on a thread while the step runs."""
        grammars = [(s.request_id, g) for s in seqs if s.sample and (g := requests[s.request_id].grammar) and g.active]
        if not grammars:
            return None
        return StepMasks(grammars, self.vocab_size, self._mask_pool, self.mask_stats)

    def stats(self) -> dict[str, Any]:
        """EngineStats' structured-output fields."""
        compiled, masks = self.grammars.stats, self.mask_stats
        return {
            "constrained_requests": compiled.constrained_requests,
            "grammar_compiles": compiled.compiled,
            "grammar_cache_hits": compiled.cache_hits,
            "grammar_compile_failures": compiled.compile_failures,
            "grammar_compile_seconds": compiled.compile_seconds,
            "masked_steps": masks.steps,
            "mask_fill_seconds": masks.fill_seconds,
            "mask_wait_seconds": masks.wait_seconds,
        }
