"""Constraints compiled with llguidance, once per distinct grammar; one matcher per constrained sequence.

llguidance (https://github.com/guidance-ai/llguidance) was picked over
xgrammar: it builds a grammar lazily (an Earley parser over a lazily built
lexer), so a new schema is ready in about a millisecond instead of needing an
up-front compile, it bounds the work of every mask by "fuel" limits, and it
installs as one small wheel with no dependencies (xgrammar pulls torch and
transformers at versions of its own). Its masks take a few milliseconds for
a 49k-token vocabulary (benchmarks/NOTES.md).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from hawker.structured.params import StructuredOutputsParams

# A constraint that takes longer than this to build is refused (the compile
# runs on a worker thread; llguidance's limits below bound what it can cost).
COMPILE_TIMEOUT_S = 10.0
CACHED_GRAMMARS = 256


@dataclass
class GrammarStats:
    """Counters for /metrics."""

    compiled: int = 0
    cache_hits: int = 0
    compile_seconds: float = 0.0


class SequenceGrammar:
    """One sequence's place in its constraint: which tokens may come next, and whether it is complete."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row ``row`` of ``bitmask`` (int32 on the host, bit ``t % 32`` of word ``t // 32`` for token
        ``t``) to the tokens allowed next."""
        words = bitmask[row]
        assert words.is_contiguous() and words.dtype == torch.int32 and words.device.type == "cpu"
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token: int) -> None:
        """Advance past ``token`` (sampled under this grammar's mask, so always allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The constraint is satisfied and allows nothing more (but the end of the sequence)."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` for one tokenizer. Thread-safe: the server checks requests off the
    engine's thread, and the engine compiles (or finds) the same grammar again when the request is added."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_id: int | None) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_id = eos_token_id
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        # Keyed by the params themselves (frozen, hashable): a lookup parses nothing.
        self._templates: OrderedDict[StructuredOutputsParams, llguidance.LLMatcher] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hawker-grammar")
        self.stats = GrammarStats()

    def check(self, params: StructuredOutputsParams) -> None:
        """Raise ``ValueError`` (saying what is wrong) unless ``params`` compiles in time; caches the result."""
        self._template(params)

    def matcher(self, params: StructuredOutputsParams) -> SequenceGrammar:
        """A fresh matcher of ``params``' grammar, at its start."""
        return SequenceGrammar(self._template(params).deep_copy())

    def _template(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        with self._lock:
            template = self._templates.get(params)
            if template is not None:
                self._templates.move_to_end(params)
                self.stats.cache_hits += 1
                return template
            future = self._pool.submit(self._build, params)
            try:
                template, seconds = future.result(timeout=COMPILE_TIMEOUT_S)
            except FutureTimeout:
                raise ValueError(
                    f"the {params.kind} constraint could not be compiled within {COMPILE_TIMEOUT_S:g} s"
                ) from None
            self.stats.compiled += 1
            self.stats.compile_seconds += seconds
            self._templates[params] = template
            if len(self._templates) > CACHED_GRAMMARS:
                self._templates.popitem(last=False)
            return template

    def _build(self, params: StructuredOutputsParams) -> tuple[llguidance.LLMatcher, float]:
        start = time.perf_counter()
        kind = params.kind
        grammar_format, text = params.grammar_source()
        tokenizer = self._llg_tokenizer()
        try:
            grammar = llguidance.grammar_from(grammar_format, text)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"invalid {kind} constraint: {error}") from error
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"invalid {kind} constraint: {_first_line(messages)}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {kind} constraint: {matcher.get_error()}")
        return matcher, time.perf_counter() - start

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        # Built once (about 0.6 s for a 49k vocabulary), on the first constrained request.
        if self._tokenizer is None:
            if not self._hf_tokenizer.is_fast:
                raise ValueError("structured outputs need a fast (Rust) tokenizer, which this model does not have")
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer,  # type: ignore[arg-type]  # a fast tokenizer, checked above
                n_vocab=self.vocab_size,
                eos_token=self._eos_token_id,
            )
        return self._tokenizer


def _first_line(messages: list[str]) -> str:
    text = messages[0] if messages else "rejected by the grammar library"
    return " ".join(text.split())[:500]
