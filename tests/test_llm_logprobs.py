"""Logprobs for RL: what Hawker returns against the trainer's recomputation (transformers' forward).

Tolerance (float32): |hawker - transformers| <= 1e-4 nats for every sampled token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hawker import LLM, SamplingParams
from tests.support.parity import make_prompts
from tests.support.tiny_models import load_reference

TOLERANCE = 1e-4


def _trainer_logprobs(directory: Path, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log p(token_t | prefix) for each generated token, from one forward over the whole sequence."""
    model = load_reference(directory)
    sequence = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(sequence).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)


def _sampled_logprobs(
    llm: LLM, prompts: list[list[int]], params: SamplingParams
) -> list[tuple[list[int], list[float]]]:
    found = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert completion.logprobs is not None
        lps = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs, strict=True)]
        found.append((completion.token_ids, lps))
    return found


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(tiny_checkpoints["llama"]), dtype="float32", max_num_batched_tokens=16)


def test_sampling_logprobs_at_temperature_one_match_the_trainer(llm: LLM, tiny_checkpoints: dict[str, Path]) -> None:
    prompts = make_prompts(seed=13)[:4]
    params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=7, ignore_eos=True)
    worst = 0.0
    for prompt, (tokens, lps) in zip(prompts, _sampled_logprobs(llm, prompts, params), strict=True):
        expected = _trainer_logprobs(tiny_checkpoints["llama"], prompt, tokens)
        worst = max(worst, (torch.tensor(lps) - expected).abs().max().item())
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.8, "repetition_penalty": 1.2},
        {"temperature": 0.0},
        {"temperature": 0.9, "min_p": 0.05, "presence_penalty": 0.5},
    ],
)
def test_raw_logprobs_match_the_trainer_under_any_sampling(
    llm: LLM, tiny_checkpoints: dict[str, Path], settings: dict[str, float]
) -> None:
    prompts = make_prompts(seed=14)[:3]
    params = SamplingParams(max_tokens=10, logprobs=2, logprobs_mode="raw", seed=3, ignore_eos=True, **settings)
    for prompt, (tokens, lps) in zip(prompts, _sampled_logprobs(llm, prompts, params), strict=True):
        expected = _trainer_logprobs(tiny_checkpoints["llama"], prompt, tokens)
        assert (torch.tensor(lps) - expected).abs().max().item() <= TOLERANCE


def test_processed_logprobs_follow_the_sampling_distribution(llm: LLM) -> None:
    # top_k=2: the processed distribution has two tokens, whose probabilities sum to 1.
    params = SamplingParams(temperature=0.8, top_k=2, max_tokens=6, logprobs=2, seed=1, ignore_eos=True)
    out = llm.generate([make_prompts(seed=15)[0]], params, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None
    for entry in out.logprobs:
        top_two = sorted((lp.logprob for lp in entry.values() if lp.rank <= 2), reverse=True)[:2]
        assert abs(sum(torch.tensor(top_two).exp().tolist()) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="logprobs_mode"):
        SamplingParams(logprobs_mode="softmax")
