"""Streamed text deltas: never half a UTF-8 character, never a sent piece of a stop string."""

from __future__ import annotations

import pytest

from hawker.engine.detokenizer import IncrementalDetokenizer
from hawker.outputs import CompletionOutput
from hawker.server.formatting import StreamState
from tests.support.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tokenizer()


def _stream(tokenizer, text: str, stops: tuple[str, ...] = ()) -> tuple[list[str], str, str | None]:  # type: ignore[no-untyped-def]
    """Feed text's tokens one by one; returns the deltas a client would get, the final text, the stop hit."""
    detok = IncrementalDetokenizer.for_prompt(tokenizer, [], True, stops, False)
    state = StreamState()
    deltas: list[str] = []
    token_ids = tokenizer(text).input_ids
    hit = None
    for count, token in enumerate(token_ids, start=1):
        hit = detok.add_token(token)
        done = hit is not None or count == len(token_ids)
        visible = detok.text if done else detok.streamable_text()
        delta = state.delta(0, CompletionOutput(0, visible, token_ids[:count], None, "stop" if done else None))
        if delta is not None and delta.text:
            deltas.append(delta.text)
        if hit is not None:
            break
    return deltas, detok.text, hit


def test_multibyte_characters_are_never_split(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "naïve café € 😀 ok"
    ids = tokenizer(text).input_ids
    # The byte-level tokenizer splits these characters into several tokens each.
    assert len(ids) > len(text.split())
    deltas, final, _ = _stream(tokenizer, text)
    assert "".join(deltas) == final == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_stop_string_pieces_are_held_back(tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas, final, hit = _stream(tokenizer, "The quick brown fox jumps", stops=("brown fox",))
    assert hit == "brown fox"
    assert final == "The quick "
    assert "".join(deltas) == final  # nothing sent was taken back
    assert not any("brown" in delta for delta in deltas)


def test_streamable_text_releases_a_false_start(tokenizer) -> None:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer.for_prompt(tokenizer, [], True, ("abcx",), False)
    for token in tokenizer("zz abc").input_ids:
        detok.add_token(token)
    assert detok.text == "zz abc"
    assert detok.streamable_text() == "zz "  # "abc" may still become "abcx"
    for token in tokenizer("d").input_ids:
        detok.add_token(token)
    assert detok.streamable_text() == "zz abcd"
