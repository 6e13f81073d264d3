"""Incremental detokenization that never emits half a UTF-8 character, plus stop strings."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# Prompt tokens kept as left context: some tokenizers (SentencePiece) decode
# a token differently at the start of a string than after other text.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: PreTrainedTokenizerBase
    skip_special_tokens: bool
    tokens: list[int]
    prefix_offset: int
    read_offset: int
    text: str = ""
    stop_strings: tuple[str, ...] = ()
    include_stop_str: bool = False

    @classmethod
    def for_prompt(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool,
        stop_strings: tuple[str, ...],
        include_stop_str: bool,
    ) -> IncrementalDetokenizer:
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        return cls(
            tokenizer=tokenizer,
            skip_special_tokens=skip_special_tokens,
            tokens=context,
            prefix_offset=0,
            read_offset=len(context),
            stop_strings=stop_strings,
            include_stop_str=include_stop_str,
        )

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if the text now contains one."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return None  # an incomplete UTF-8 sequence: wait for more bytes
        new_text = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._append_text(new_text)

    def _decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)
        assert isinstance(text, str), "one sequence decodes to one string"
        return text

    def streamable_text(self) -> str:
        """The text minus a tail that could still become the start of a stop string.

        Streaming only this keeps every delta final: a stop string found later
        always starts at or after this point, so nothing sent is taken back.
        """
        held = 0
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return self.text[: len(self.text) - held]

    def _append_text(self, new_text: str) -> str | None:
        search_from = len(self.text)
        self.text += new_text
        if not self.stop_strings:
            return None
        longest = max(len(s) for s in self.stop_strings)
        window_start = max(0, search_from - longest + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            at = self.text.find(stop, window_start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[: at + len(stop)] if self.include_stop_str else self.text[:at]
        return stop
