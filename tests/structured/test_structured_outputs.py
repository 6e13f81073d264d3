"""Structured outputs (hawker/structured/): every constrained output matches its constraint, unconstrained
requests in the same steps are unchanged, and a bad constraint is refused before anything is allocated."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import jsonschema
import pytest
import torch

from hawker import LLM, SamplingParams
from hawker.structured.params import MAX_CHOICES, MAX_CONSTRAINT_CHARS, StructuredOutputsParams
from tests.support.parity import assert_pool_full, make_prompts

# Bounded schemas: whatever a random-weight model prefers, the constraint closes them within the budget.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "boolean"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "kind": {"anyOf": [{"const": "circle"}, {"type": "integer", "minimum": 0, "maximum": 3}]},
        },
        "required": ["point", "kind"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "minItems": 2, "maxItems": 2},
]
BUDGET = 120
# 50 MB of KV cache holds ~100k tokens of the tiny model; the 2 GB default takes seconds to zero.
SMALL_POOL = {"kv_cache_memory_gb": 0.05}


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> LLM:
    # Eager decode: masks act on the logits, after the forward, whichever way it runs.
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", max_num_seqs=8, compile_decode_max_rows=0, **SMALL_POOL)


def constrained(seed: int, **constraint: object) -> SamplingParams:
    return SamplingParams(max_tokens=BUDGET, temperature=1.0, seed=seed, structured_outputs=constraint)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_sampled_json_validates_against_its_schema(llm: LLM, index: int) -> None:
    schema = SCHEMAS[index]
    outputs = llm.generate(make_prompts(seed=index)[:4], constrained(seed=index, json=schema), use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
        # Keys in the schema's order, separators as json.dumps writes them.
        assert completion.text == json.dumps(json.loads(completion.text), ensure_ascii=False)
    assert_pool_full(llm)


def test_json_object_regex_choice_and_grammar_are_matched(llm: LLM) -> None:
    prompts = make_prompts(seed=7)[:3]
    for output in llm.generate(prompts, constrained(1, json_object=True), use_tqdm=False):
        text = output.outputs[0].text
        assert output.outputs[0].finish_reason in ("stop", "length")
        if output.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    pattern = r"[0-9]{3}-[a-c]{2,4}"
    for output in llm.generate(prompts, constrained(2, regex=pattern), use_tqdm=False):
        assert re.fullmatch(pattern, output.outputs[0].text), output.outputs[0].text
    choices = ["alpha", "beta", "gamma delta"]
    for output in llm.generate(prompts, constrained(3, choice=choices), use_tqdm=False):
        assert output.outputs[0].text in choices and output.outputs[0].finish_reason == "stop"
    grammar = 'start: "(" item ("," item)* ")"\nitem: /[xyz]/'
    for output in llm.generate(prompts, constrained(4, grammar=grammar), use_tqdm=False):
        text = output.outputs[0].text
        assert output.outputs[0].finish_reason == "length" or re.fullmatch(r"\([xyz](,[xyz])*\)", text), text
    assert_pool_full(llm)


def test_unconstrained_requests_are_unchanged_beside_constrained_ones(llm: LLM) -> None:
    prompts = make_prompts(seed=11)[:3]
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    mixed_params = [greedy, constrained(5, json=SCHEMAS[0]), greedy, constrained(6, choice=["p", "q"]), greedy]
    mixed = llm.generate([prompts[0], prompts[0], prompts[1], prompts[1], prompts[2]], mixed_params, use_tqdm=False)
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 4)] == alone


def test_each_of_n_samples_has_its_own_matcher(llm: LLM) -> None:
    params = SamplingParams(n=4, max_tokens=BUDGET, temperature=1.0, seed=3, structured_outputs={"json": SCHEMAS[1]})
    (output,) = llm.generate(make_prompts(seed=2)[:1], params, use_tqdm=False)
    for completion in output.outputs:
        jsonschema.validate(json.loads(completion.text), SCHEMAS[1])


def test_overlap_scheduling_gives_the_same_constrained_text(tiny_checkpoints: dict[str, Path], llm: LLM) -> None:
    overlapped = LLM(
        str(tiny_checkpoints["llama"]),
        dtype="float32",
        max_num_seqs=8,
        overlap_scheduling=True,
        compile_decode_max_rows=0,
        **SMALL_POOL,
    )
    prompts = make_prompts(seed=4)[:3]
    params = [
        constrained(9, json=SCHEMAS[0]),
        SamplingParams(max_tokens=12, temperature=0.0),
        constrained(8, regex="[ab]{5}"),
    ]
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].text for o in overlapped.generate(prompts, params, use_tqdm=False)] == expected


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ({"regex": "a("}, "invalid regex constraint"),
        ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "invalid json constraint"),
        ({"grammar": "start: undefined_rule"}, "invalid grammar constraint"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"choice": []}, "non-empty list"),
        ({"regex": "a", "choice": ["a"]}, "exactly one of"),
        ({"jsn": {}}, "unknown structured_outputs field"),
        ({"regex": "a" * (MAX_CONSTRAINT_CHARS + 1)}, "at most"),
        ({"choice": ["a"] * (MAX_CHOICES + 1)}, "at most"),
    ],
)
def test_a_bad_constraint_is_refused_and_changes_nothing(llm: LLM, constraint: dict, message: str) -> None:
    engine = llm.engine
    with pytest.raises(ValueError, match=message):
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=constraint), use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert_pool_full(llm)


def test_the_grammar_cache_compiles_a_schema_once(llm: LLM) -> None:
    stats = llm.engine.grammars.stats
    schema = {"type": "object", "properties": {"only": {"const": 1}}, "required": ["only"]}
    before = stats.compiled
    for _ in range(3):
        llm.generate(["x"], constrained(1, json=schema), use_tqdm=False)
    assert stats.compiled == before + 1


def test_step_masks_cross_processes_filled(llm: LLM) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from hawker.structured.masks import StepMasks

    grammar = llm.engine.grammars.matcher(StructuredOutputsParams(choice=["abc", "abd"]))
    with ThreadPoolExecutor(1) as pool:
        masks = StepMasks([("r", grammar)], llm.engine.config.model.vocab_size, pool)
        copy = pickle.loads(pickle.dumps(masks))
    assert torch.equal(copy.bitmask(), masks.bitmask()) and copy.rows == {"r": 0}
    assert int(masks.bitmask().count_nonzero()) > 0


def test_unpacked_masks_match_llguidance_s_own() -> None:
    import llguidance.torch

    from hawker.structured.masks import unpack_bits

    generator = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    words = torch.randint(-(2**31), 2**31 - 1, (3, -(-vocab // 32)), generator=generator, dtype=torch.int64).int()
    logits = torch.randn(3, vocab, generator=generator)
    expected = logits.clone()
    llguidance.torch.apply_token_bitmask_inplace(expected, words)
    assert torch.equal(logits.masked_fill(~unpack_bits(words, vocab), float("-inf")), expected)
