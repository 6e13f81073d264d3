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

import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from hawker.structured.params import StructuredOutputsParams

# The default limit on building one constraint; a constraint that takes longer is refused (and stays
# refused: the time is a property of the constraint, not of the load). llguidance's own limits (grammar
# size, lexer fuel) bound what any build can cost, so a build that overran still ends.
COMPILE_TIMEOUT_S = 10.0
CACHED_GRAMMARS = 256
COMPILE_THREADS = 2  # a slow build does not hold up the others


@dataclass
class GrammarStats:
    """Counters for /metrics (written under the compiler's lock)."""

    constrained_requests: int = 0
    compiled: int = 0
    cache_hits: int = 0  # constrained requests whose constraint was already built for an earlier one
    compile_failures: int = 0
    compile_seconds: float = 0.0


@dataclass
class _Entry:
    """A constraint being built or built (or refused): the future holds the template or the ValueError."""

    future: Future[llguidance.LLMatcher]
    uses: int = 0


class SequenceGrammar:
    """One sequence's place in its constraint: which tokens may come next, and whether it is complete.

    ``starts_after``: token ids (a reasoning model's ``</think>``) that the constraint waits for; until the
    output has produced them it is not ``active``: no mask, and the tokens are not fed to it.
    """

    def __init__(self, matcher: llguidance.LLMatcher, starts_after: tuple[int, ...] | None = None) -> None:
        self.matcher = matcher
        self._starts_after = starts_after or None
        self._recent: list[int] = []  # the last tokens while waiting, to find starts_after

    @property
    def active(self) -> bool:
        return self._starts_after is None

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set row ``row`` of ``bitmask`` (int32 on the host, bit ``t % 32`` of word ``t // 32`` for token
        ``t``) to the tokens allowed next."""
        words = bitmask[row]
        assert words.is_contiguous() and words.dtype == torch.int32 and words.device.type == "cpu"
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token: int) -> None:
        """Advance past ``token`` (sampled under this grammar's mask, so always allowed)."""
        if self._starts_after is not None:
            self._recent = [*self._recent, token][-len(self._starts_after) :]
            if tuple(self._recent) == self._starts_after:
                self._starts_after = None  # the constraint applies from the next token on
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The constraint is satisfied and allows nothing more (but the end of the sequence)."""
        return self.active and self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` for one tokenizer, each distinct one once (its result, a template
    or the reason it was refused, is cached). Thread-safe: the server checks requests off the engine's
    thread, and the engine finds the same grammar again when the request is added. The lock guards only the
    cache, never a build: a slow build keeps no other request waiting."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_token_id: int | None,
        timeout_s: float = COMPILE_TIMEOUT_S,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"the grammar compile timeout must be > 0 seconds, got {timeout_s}")
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_id = eos_token_id
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        # Keyed by the params themselves (frozen, hashable): a lookup parses nothing.
        self._entries: OrderedDict[StructuredOutputsParams, _Entry] = OrderedDict()
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="hawker-grammar")
        self.stats = GrammarStats()

    def check(self, params: StructuredOutputsParams) -> None:
        """Raise ``ValueError`` (saying what is wrong) unless ``params`` compiles in time."""
        self._wait(self._entry(params), params)

    def matcher(
        self, params: StructuredOutputsParams, new_request: bool = True, starts_after: tuple[int, ...] | None = None
    ) -> SequenceGrammar:
        """A fresh matcher of ``params``' grammar, at its start (or waiting for ``starts_after``).
        ``new_request``: count it in the stats (once per request, not per sequence); the first request after a
        build is its miss, later ones are hits."""
        entry = self._entry(params)
        template = self._wait(entry, params)
        if new_request:
            with self._lock:
                self.stats.constrained_requests += 1
                self.stats.cache_hits += entry.uses > 0
                entry.uses += 1
        return SequenceGrammar(template.deep_copy(), starts_after)

    def _entry(self, params: StructuredOutputsParams) -> _Entry:
        with self._lock:
            entry = self._entries.get(params)
            if entry is not None:
                self._entries.move_to_end(params)
                return entry
        # Wrapped once, by the first caller, outside any build's time limit.
        self._llg_tokenizer()
        with self._lock:
            entry = self._entries.get(params)
            if entry is not None:
                return entry
            entry = self._entries[params] = _Entry(self._pool.submit(self._build_timed, params))
            if len(self._entries) > CACHED_GRAMMARS:
                self._entries.popitem(last=False)
            return entry

    def _wait(self, entry: _Entry, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        try:
            return entry.future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise ValueError(self._timeout_message(params)) from None

    def _timeout_message(self, params: StructuredOutputsParams) -> str:
        return f"the {params.kind} constraint could not be compiled within {self.timeout_s:g} s; simplify it"

    def _build_timed(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        tokenizer = self._llg_tokenizer()  # wrapped already (by _entry)
        start = time.perf_counter()
        built = True
        try:
            template = self._build(params, tokenizer)
            if time.perf_counter() - start > self.timeout_s:
                raise ValueError(self._timeout_message(params))
            return template
        except ValueError:
            built = False
            raise
        finally:
            with self._lock:
                self.stats.compile_seconds += time.perf_counter() - start
                self.stats.compiled += built
                self.stats.compile_failures += not built

    def _build(self, params: StructuredOutputsParams, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
        kind = params.kind
        grammar_format, text = params.grammar_source()
        try:
            grammar = llguidance.grammar_from(grammar_format, text)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"invalid {kind} constraint: {error}") from error
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"invalid {kind} constraint: {_explained(_first_line(messages))}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {kind} constraint: {matcher.get_error()}")
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        # Built once (about 0.4 s for a 49k vocabulary), on the first constrained request.
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self._wrap_tokenizer()
            return self._tokenizer

    def _wrap_tokenizer(self) -> llguidance.LLTokenizer:
        if not self._hf_tokenizer.is_fast:
            raise ValueError("structured outputs need a fast (Rust) tokenizer, which this model does not have")
        return llguidance.hf.from_tokenizer(
            self._hf_tokenizer,  # type: ignore[arg-type]  # a fast tokenizer, checked above
            n_vocab=self.vocab_size,
            eos_token=self._eos_token_id,
        )


def _explained(message: str) -> str:
    """llguidance's message, led by what a JSON-schema user needs: which keyword or format is unsupported."""
    keys = _UNIMPLEMENTED_KEYS.search(message)
    if keys:
        return f"the JSON schema uses unsupported keyword(s) {keys.group(1)} ({message})"
    found = _UNKNOWN_FORMAT.search(message)
    if found:
        return f"the JSON schema uses the unsupported string format {found.group(1)!r} ({message})"
    return message


_UNIMPLEMENTED_KEYS = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")


def _first_line(messages: list[str]) -> str:
    text = messages[0] if messages else "rejected by the grammar library"
    return " ".join(text.split())[:500]
