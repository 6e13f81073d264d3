"""The check for text that is not valid Unicode (hawker/server/text_input.py): fast on the bytes, exact on the body."""

from __future__ import annotations

import json
import time

import pytest

from hawker.server.text_input import BadText, find_bad_text, may_hold_bad_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"prompt": "plain ascii"}', False),
        ('{"prompt": "caf\u00e9 \U0001f600"}'.encode(), False),  # raw UTF-8, astral included
        (b'{"prompt": "\\ud83d\\ude00 \\uD83D\\uDE00"}', False),  # escaped pairs, either case
        (b'{"prompt": "\\ud800"}', True),
        (b'{"prompt": "\\udfff"}', True),
        (b'{"prompt": "\\ud83d\\ud83d\\ude00"}', True),  # a high half followed by a whole pair
        (b'{"prompt": "x\\ude00"}', True),
        (b'{"prompt": "\xed\xa0\x80"}', True),  # a surrogate encoded as UTF-8 bytes
        ('{"prompt": "x"}'.encode("utf-16"), True),  # not UTF-8: always walked
    ],
)
def test_the_byte_test_never_misses_a_lone_surrogate(raw: bytes, expected: bool) -> None:
    assert may_hold_bad_text(raw) is expected
    if not expected:
        assert find_bad_text(json.loads(raw)) is None


def test_the_walk_names_the_first_bad_string() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "ok"}, {"role": "user", "name": "a\udc80"}]}
    assert find_bad_text(body) == BadText(("messages", 1, "name"), 0xDC80, 1)
    assert find_bad_text({"logit_bias": {"\ud800": 1}}) == BadText(("logit_bias",), 0xD800, 0)
    assert find_bad_text({"prompt": [[1, 2], ["x", 5.0, None, True]]}) is None
    deep: object = "\ud800"
    for _ in range(10_000):  # deeper than Python's recursion limit
        deep = [deep]
    found = find_bad_text({"prompt": deep})
    assert found is not None and found.param == "prompt" and len(found.path) == 10_001


def test_a_large_clean_body_costs_only_a_byte_search() -> None:
    raw = json.dumps({"prompt": [[7]] * 10**6, "text": "\U0001f600" * 10**5}).encode()
    start = time.perf_counter()
    assert not may_hold_bad_text(raw)
    assert time.perf_counter() - start < 1.0  # about 0.1 s here; walking the body takes seconds
