"""The grammar compiler's time limit and cache (a slow build is refused, stays refused, and holds up no
other), closed objects, and a reasoning model's constraint that waits for the end of its thinking."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hawker import LLM, SamplingParams
from hawker.loader.tokenizer import load_tokenizer
from hawker.structured.grammars import GrammarCompiler
from hawker.structured.params import StructuredOutputsParams, closed_objects

# Integer ranges each become a regex: building this grammar takes about a second.
SLOW = StructuredOutputsParams(
    json={
        "type": "object",
        "properties": {f"k{i}": {"type": "integer", "minimum": i * 13, "maximum": i * 1000 + 7} for i in range(6000)},
        "required": [f"k{i}" for i in range(6000)],
    }
)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoints: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_tokenizer(tiny_checkpoints["llama"])


def test_a_slow_build_is_refused_stays_refused_and_blocks_no_other(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    compiler = GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), tiny_tokenizer.eos_token_id, timeout_s=0.05)
    compiler.check(StructuredOutputsParams(regex="warm"))  # the tokenizer is wrapped outside any limit
    with pytest.raises(ValueError, match=r"could not be compiled within 0\.05 s"):
        compiler.check(SLOW)
    start = time.perf_counter()
    compiler.check(StructuredOutputsParams(regex="[a-z]+"))  # while the slow build still runs
    assert time.perf_counter() - start < 0.05 * 20
    deadline = time.monotonic() + 60
    while compiler.stats.compile_failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the build runs on, and ends over its limit
    assert compiler.stats.compile_failures == 1 and compiler.stats.compile_seconds > 0.05
    with pytest.raises(ValueError, match="could not be compiled within"):
        compiler.check(SLOW)  # the same answer after the build ended, not a late success


def test_objects_that_list_properties_are_closed_to_others() -> None:
    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"a": {}}}, "enum": {"const": {"properties": {}}}},
        "$defs": {"d": {"properties": {"b": {}}}},
        "allOf": [{"properties": {"c": {}}}],
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["enum"] == {"const": {"properties": {}}}  # data, not a schema
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]  # each member lists only part of the keys
    assert closed_objects({"type": "object", "additionalProperties": True}) == {
        "type": "object",
        "additionalProperties": True,
    }


def test_a_reasoning_model_s_constraint_waits_for_the_end_of_its_thinking(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(
        str(tiny_checkpoints["llama"]),
        dtype="float32",
        reasoning_parser="qwen3",
        compile_decode_max_rows=0,
        kv_cache_memory_gb=0.05,
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, structured_outputs={"regex": "[0-9]{12}"})
    # The prompt closed the think block (thinking turned off): the constraint applies from the first token.
    closed = llm.generate(["Q: a number?\n<think>\n\n</think>\n\n"], params, use_tqdm=False)[0].outputs[0]
    assert closed.text.isdigit() and len(closed.text) == 12
    masked = llm.engine.constraints.mask_stats.steps
    assert masked > 0
    # Otherwise it waits for </think>, which this random model never writes: no masks, free text.
    free = llm.generate(["Q: a number?\n"], params, use_tqdm=False)[0].outputs[0]
    assert llm.engine.constraints.mask_stats.steps == masked
    assert not free.text.isdigit()

    end = tuple(llm.engine.tokenizer.encode("</think>", add_special_tokens=False))
    grammar = llm.engine.grammars.matcher(StructuredOutputsParams(regex="[0-9]{2}"), starts_after=end)
    for token in llm.engine.tokenizer.encode("hmm </think", add_special_tokens=False):
        grammar.accept(token)  # thinking: not the grammar's business
        assert not grammar.active
    grammar.accept(end[-1])
    assert grammar.active and not grammar.complete
    for token in llm.engine.tokenizer.encode("42", add_special_tokens=False):
        grammar.accept(token)
    assert grammar.complete
