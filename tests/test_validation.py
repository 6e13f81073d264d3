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
