"""Every invalid input gets a ValueError that names the field and the allowed range, and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hawker import LLM, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"temperature": -0.5}, ["temperature", ">= 0", "-0.5"]),
        ({"top_p": 0.0}, ["top_p", "(0, 1]"]),
        ({"top_p": 1.5}, ["top_p", "(0, 1]", "1.5"]),
        ({"top_k": 0}, ["top_k", "-1"]),
        ({"min_p": 1.5}, ["min_p", "[0, 1]"]),
        ({"n": 0}, ["n", ">= 1"]),
        ({"max_tokens": 0}, ["max_tokens", ">= 1"]),
        ({"min_tokens": -1}, ["min_tokens", ">= 0"]),
        ({"min_tokens": 8, "max_tokens": 4}, ["min_tokens", "max_tokens (4)"]),
        ({"repetition_penalty": 0.0}, ["repetition_penalty", "> 0"]),
        ({"presence_penalty": 2.5}, ["presence_penalty", "[-2, 2]"]),
        ({"frequency_penalty": -3.0}, ["frequency_penalty", "[-2, 2]"]),
        ({"logprobs": 21}, ["logprobs", "[0, 20]"]),
        ({"prompt_logprobs": -1}, ["prompt_logprobs", "[0, 20]"]),
        ({"stop": ["ok", ""]}, ["stop", "empty"]),
        ({"seed": "abc"}, ["seed", "integer"]),
        ({"temprature": 0.5}, ["temprature", "unknown", "temperature"]),
        # Bounds (OpenAI's ranges where it states them; see hawker/sampling_params.py).
        ({"n": 129}, ["n", "128", "129"]),
        ({"n": 10**9}, ["n", "128"]),
        ({"n": 2.0}, ["n", "integer"]),
        ({"temperature": 2.01}, ["temperature", "<= 2"]),
        ({"temperature": float("inf")}, ["temperature", "finite"]),
        ({"temperature": float("nan")}, ["temperature", "finite"]),
        ({"top_p": float("nan")}, ["top_p", "finite"]),
        ({"min_p": float("-inf")}, ["min_p", "finite"]),
        ({"presence_penalty": float("nan")}, ["presence_penalty", "finite"]),
        ({"frequency_penalty": float("inf")}, ["frequency_penalty", "finite"]),
        ({"repetition_penalty": 2.5}, ["repetition_penalty", "<= 2"]),
        ({"repetition_penalty": float("nan")}, ["repetition_penalty", "finite"]),
        ({"top_k": -2}, ["top_k", "-1"]),
        ({"max_tokens": 2**20 + 1}, ["max_tokens", str(2**20)]),
        ({"min_tokens": 2**20 + 1, "max_tokens": None}, ["min_tokens", str(2**20)]),
        ({"logprobs": 10**6}, ["logprobs", "[0, 20]"]),
        ({"seed": 2**63}, ["seed", "64 bits"]),
        ({"seed": -(2**63) - 1}, ["seed", "64 bits"]),
        ({"seed": True}, ["seed", "integer"]),
        ({"stop": ["x"] * 33}, ["stop", "32", "33"]),
        ({"stop": "x" * 1025}, ["stop", "1024", "1025"]),
        ({"stop_token_ids": [-3]}, ["stop_token_ids", ">= 0", "-3"]),
        ({"stop_token_ids": list(range(1025))}, ["stop_token_ids", "1024", "1025"]),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, ["logit_bias", "300", "301"]),
        ({"logit_bias": {5: float("nan")}}, ["logit_bias", "[-100, 100]"]),
        ({"logit_bias": {5: float("inf")}}, ["logit_bias", "[-100, 100]"]),
        ({"logit_bias": {-1: 1.0}}, ["logit_bias", ">= 0", "-1"]),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict[str, object], names: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_valid_edge_values_are_accepted() -> None:
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, n=1, max_tokens=1, logprobs=20)
    assert params.greedy
    SamplingParams(
        n=128,
        temperature=2.0,
        repetition_penalty=2.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        seed=2**63 - 1,
        stop=["x" * 1024] * 32,
        stop_token_ids=[0] * 1024,
        logit_bias={i: -100.0 for i in range(300)},
        max_tokens=2**20,
        min_tokens=2**20,
        prompt_logprobs=20,
    )
    SamplingParams(seed=-(2**63), repetition_penalty=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"logit_bias": {384: 1.0}}, ["logit_bias", "384", "[0, 384)"]),
        ({"stop_token_ids": [5, 384]}, ["stop_token_ids", "384", "[0, 384)"]),
        ({"top_k": 385}, ["top_k", "384", "385"]),
    ],
)
def test_ids_outside_the_vocabulary_name_the_field(kwargs: dict[str, object], names: list[str]) -> None:
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError) as info:
        params.check_vocab(384)
    assert str(info.value).startswith(names[0])
    for name in names:
        assert name in str(info.value)
    SamplingParams(logit_bias={383: 1.0}, stop_token_ids=[0, 383], top_k=384, logprobs=20).check_vocab(384)


def test_replace_validates_the_copy() -> None:
    params = SamplingParams(n=2, stop=["x"], logit_bias={5: 1.0}, max_tokens=None, min_tokens=3)
    copy = params.replace(max_tokens=8)
    assert copy.max_tokens == 8 and copy.stop == ("x",) and copy.logit_bias == ((5, 1.0),) and copy.n == 2
    with pytest.raises(ValueError, match="min_tokens"):
        params.replace(max_tokens=2)


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> LLM:
    # 16 blocks of 4 tokens: a pool of 64 slots, max_model_len 48.
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", block_size=4, num_kv_blocks=16, max_model_len=48)


def _assert_untouched(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.kv.block_tables
    assert not engine.scheduler.requests


@pytest.mark.parametrize(
    ("prompt", "params", "numbers"),
    [
        ([], SamplingParams(), ["empty"]),
        (list(range(3, 51)), SamplingParams(max_tokens=1), ["48 tokens", "max_model_len is 48", "47"]),
        (list(range(3, 43)), SamplingParams(max_tokens=10), ["40 tokens", "max_tokens is 10", "50", "48"]),
        ([5, 6, 100000], SamplingParams(), ["100000", "vocabulary"]),
        ([5, -1], SamplingParams(), ["-1", "vocabulary"]),
        ([5, 6], SamplingParams(stop_token_ids=[100000]), ["stop_token_ids", "100000", "vocabulary"]),
        ([5, 6], SamplingParams(logit_bias={100000: 1.0}), ["logit_bias", "100000", "vocabulary"]),
        ([5, 6], SamplingParams(top_k=100000), ["top_k", "100000"]),
        (list(range(3, 43)), SamplingParams(max_tokens=None, min_tokens=9), ["min_tokens", "8", "9"]),
    ],
)
def test_bad_prompt_raises_and_allocates_nothing(
    llm: LLM, prompt: list[int], params: SamplingParams, numbers: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        llm.generate([prompt], params, use_tqdm=False)
    for number in numbers:
        assert number in str(info.value)
    _assert_untouched(llm)


def test_bad_prompt_in_a_batch_queues_none_of_the_batch(llm: LLM) -> None:
    good = [5, 6, 7, 8]
    with pytest.raises(ValueError, match="empty"):
        llm.generate([good, good, []], SamplingParams(max_tokens=4), use_tqdm=False)
    _assert_untouched(llm)
    # The engine still works afterwards.
    out = llm.generate([good], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    _assert_untouched(llm)


def test_request_larger_than_the_pool_is_rejected(tiny_checkpoints: dict[str, Path]) -> None:
    small = LLM(str(tiny_checkpoints["llama"]), dtype="float32", block_size=4, num_kv_blocks=4, max_model_len=48)
    with pytest.raises(ValueError) as info:
        small.generate([list(range(3, 13))], SamplingParams(max_tokens=10), use_tqdm=False)
    message = str(info.value)
    assert "5 KV blocks" in message and "only 4" in message
    _assert_untouched(small)


def test_mismatched_params_count_is_rejected(llm: LLM) -> None:
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate([[5], [6], [7]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    _assert_untouched(llm)


def test_unknown_llm_option_names_it(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError) as info:
        LLM(str(tiny_checkpoints["llama"]), dtype="float32", max_modle_len=64)
    assert "max_modle_len" in str(info.value) and "max_model_len" in str(info.value)


def test_unknown_dtype_names_the_choices(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError) as info:
        LLM(str(tiny_checkpoints["llama"]), dtype="float8")
    assert "float8" in str(info.value) and "bfloat16" in str(info.value)


def test_device_auto_picks_the_gpu_when_visible_and_bad_names_are_rejected(tiny_checkpoints: dict[str, Path]) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32")
    assert llm.engine.config.device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        LLM(str(tiny_checkpoints["llama"]), dtype="float32", device="gpu0")


def test_max_model_len_beyond_the_model_is_rejected(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        LLM(str(tiny_checkpoints["llama"]), dtype="float32", max_model_len=10**7)


def test_unknown_architecture_names_the_supported_ones(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpt2ish"
    shutil.copytree(tiny_checkpoints["llama"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        LLM(str(checkpoint), dtype="float32")
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message
