"""The default SmolLM2-135M-Instruct Q4_1 GGUF against transformers' own GGUF loading.

Measured quantity: log-probabilities (logits minus their logsumexp) at every
prompt position, from hawker's prompt_logprobs (top 5) and from the
transformers model loaded from the same file, both in float32. Top-1 must
agree at every position; the max abs difference must stay below 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hawker import LLM, SamplingParams
from hawker.loader.checkpoint import default_model_path

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)
MAX_LOGPROB_DIFF = 1e-3


@pytest.fixture(scope="module")
def hawker_llm() -> LLM:
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_prompt_logprobs_match_transformers_gguf(hawker_llm: LLM, reference_model: torch.nn.Module) -> None:
    tokenizer = hawker_llm.get_tokenizer()
    params = SamplingParams(max_tokens=1, prompt_logprobs=5, temperature=0.0)
    worst = 0.0
    for text in PROMPTS:
        ids = tokenizer(text).input_ids
        out = hawker_llm.generate([ids], params, use_tqdm=False)[0]
        with torch.no_grad():
            ref = torch.log_softmax(reference_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(ids)
        for pos, entry in enumerate(out.prompt_logprobs[1:]):
            ref_row = ref[pos]  # predicts token pos + 1
            ours_top1 = next(t for t, lp in entry.items() if lp.rank == 1)
            assert ours_top1 == int(ref_row.argmax()), f"top-1 differs at position {pos} of {text!r}"
            for token, lp in entry.items():
                worst = max(worst, abs(lp.logprob - ref_row[token].item()))
    assert worst < MAX_LOGPROB_DIFF, f"max logprob difference {worst:.2e}"


def test_chat_answer_mentions_paris(hawker_llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = hawker_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"


def test_bfloat16_greedy_is_the_same_cold_and_after_a_prefix_cache_hit() -> None:
    # The default model's 64-dim heads in bfloat16 take the C prefill attention's fastest path (AMX tile
    # multiplies where the CPU has them); a cached prefix moves the tail's rows into other tiles and steps.
    llm = LLM(dtype="bfloat16", max_model_len=1024)
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer(" ".join(PROMPTS) * 12).input_ids[:600]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True)
    cold, cached = (llm.generate([prompt], params, use_tqdm=False)[0] for _ in range(2))
    assert cached.num_cached_tokens > 0
    for output in (cold, cached):
        assert output.outputs[0].logprobs is not None
    assert cached.outputs[0].token_ids == cold.outputs[0].token_ids
    assert [dict(sorted((t, lp.logprob) for t, lp in entry.items())) for entry in cached.outputs[0].logprobs] == [
        dict(sorted((t, lp.logprob) for t, lp in entry.items())) for entry in cold.outputs[0].logprobs
    ]
