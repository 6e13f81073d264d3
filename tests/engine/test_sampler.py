"""Sampling: seeded reproducibility independent of the batch, and the processors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hawker import LLM, SamplingParams
from hawker.engine.sampler import Sampler, SampleRow, _top_k_top_p, greedy_tokens
from tests.support.tiny_models import VOCAB_SIZE


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(tiny_checkpoints["qwen2"]), dtype="float32", block_size=4)


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=1234, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, seed=7, max_tokens=32, ignore_eos=True),
        SamplingParams(temperature=1.2, repetition_penalty=1.3, frequency_penalty=0.5, seed=3, max_tokens=32),
    ],
)
def test_seeded_sample_is_independent_of_batch(llm: LLM, params: SamplingParams) -> None:
    rng = random.Random(0)
    target = _prompt(rng, 21)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again
    others = [_prompt(rng, rng.randint(5, 60)) for _ in range(16)]
    other_params = [
        SamplingParams(temperature=1.0, seed=None if i % 2 else 100 + i, max_tokens=rng.randint(8, 40), ignore_eos=True)
        for i in range(16)
    ]
    batch = [*others[:7], target, *others[7:]]
    batch_params = [*other_params[:7], params, *other_params[7:]]
    outputs = llm.generate(batch, batch_params, use_tqdm=False)
    assert outputs[7].outputs[0].token_ids == alone
    # Different seeds really give different samples (the test can fail).
    other_seed = SamplingParams(**{**_params_dict(params), "seed": params.seed + 1})
    assert llm.generate([target], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def _params_dict(params: SamplingParams) -> dict[str, object]:
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "seed", "max_tokens")
    return {name: getattr(params, name) for name in fields} | {"ignore_eos": params.ignore_eos}


def test_n_seeded_samples_differ_and_reproduce(llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)
    first = [c.token_ids for c in llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs]
    second = [c.token_ids for c in llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs]
    assert first == second
    assert len({tuple(t) for t in first}) > 1


def _rows(params: SamplingParams, count: int = 1) -> list[SampleRow]:
    return [SampleRow(params, 0, 0, (), 0) for _ in range(count)]


def test_top_k_restricts_to_k_best() -> None:
    sampler = Sampler(eos_token_id=None, seed=0)
    logits = torch.arange(10, dtype=torch.float32).repeat(200, 1)
    params = SamplingParams(temperature=2.0, top_k=3)  # flat enough that all three show up
    tokens = sampler(logits, _rows(params, 200)).token_ids
    assert set(tokens) == {7, 8, 9}


def test_top_p_and_min_p_cut_the_tail() -> None:
    sampler = Sampler(eos_token_id=None, seed=0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(400, 1)
    top_p = sampler(logits, _rows(SamplingParams(temperature=1.0, top_p=0.8), 400)).token_ids
    assert set(top_p) == {0, 1}
    min_p = sampler(logits, _rows(SamplingParams(temperature=1.0, min_p=0.25), 400)).token_ids
    assert set(min_p) == {0, 1, 2}


def test_draws_follow_the_distribution() -> None:
    """Frequencies of 40,000 draws match the softmax within 5 standard errors (seeded: not flaky)."""
    sampler = Sampler(eos_token_id=None, seed=0)
    probs = torch.tensor([0.4, 0.0, 0.25, 0.2, 0.1, 0.04, 0.01])  # a zero-probability token in the middle
    rows = 40_000
    logits = probs.log().repeat(rows, 1)
    tokens = torch.tensor(sampler(logits, _rows(SamplingParams(temperature=1.0), rows)).token_ids)
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    assert counts[1] == 0
    expected = probs.double() * rows
    standard_error = (rows * probs.double() * (1 - probs.double())).sqrt()
    assert ((counts - expected).abs() <= 5 * standard_error + 1e-9).all(), (counts, expected)


def test_the_last_token_of_a_large_vocabulary_is_drawn_at_its_own_rate() -> None:
    """The vocabulary's end: one token holding 5 % behind 49,151 tiny ones."""
    vocab, rows = 49_152, 1_000
    probs = torch.full((vocab,), 0.95 / (vocab - 1))
    probs[-1] = 0.05
    tokens = torch.tensor(
        Sampler(eos_token_id=None, seed=1)(
            probs.log().repeat(rows, 1), _rows(SamplingParams(temperature=1.0), rows)
        ).token_ids
    )
    hits = int((tokens == vocab - 1).sum())
    assert abs(hits - 50) <= 5 * (50 * 0.95) ** 0.5, hits


def _reference_kept(row: torch.Tensor, k: int, p: float) -> set[int]:
    """Top-k then top-p of one row, token by token (the definition)."""
    order = sorted(range(len(row)), key=lambda i: -float(row[i]))[: len(row) if k == -1 else k]
    probs = torch.softmax(row[order].double(), dim=0).tolist()
    kept, mass = set(), 0.0
    for token, prob in zip(order, probs, strict=True):
        if kept and p < 1.0 and mass >= p:  # top_p 1 keeps everything
            break
        kept.add(token)
        mass += prob
    return kept


def test_top_k_top_p_among_candidates_matches_the_definition() -> None:
    """Peaked rows (kept set among the first candidates), flat rows (it is not: whole-row sort) and unfiltered rows."""
    generator = torch.Generator().manual_seed(0)
    vocab = 4096  # candidates * 4 < vocab: the candidates path runs
    peaked = torch.randn(4, vocab, generator=generator) * 6
    flat = torch.randn(3, vocab, generator=generator) * 0.1
    logits = torch.cat([peaked, flat, peaked[:1]])
    ks = [-1, 40, -1, 300, -1, 1000, -1, -1]
    ps = [0.9, 1.0, 0.5, 0.95, 0.9, 0.8, 1.0, 1.0]  # the last row: no filter
    out = _top_k_top_p(logits, ks, ps)
    for row, k, p, filtered in zip(logits, ks, ps, out, strict=True):
        kept = set(torch.isfinite(filtered).nonzero().flatten().tolist())
        assert kept == _reference_kept(row, k, p)
        assert torch.equal(filtered[sorted(kept)], row[sorted(kept)])


def test_penalties_and_min_tokens() -> None:
    sampler = Sampler(eos_token_id=3, seed=0)
    logits = torch.tensor([[2.0, 1.9, -1.0, 5.0]])
    # eos (3) is blocked until min_tokens outputs exist
    row = SampleRow(SamplingParams(temperature=0.0, min_tokens=2), 0, 1, (), 0)
    assert sampler(logits, [row]).token_ids == [0]
    # token 0 was generated twice: frequency penalty 1.0 pushes it below token 1
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    row = SampleRow(params, 0, 2, (2, 0, 0), 1)
    assert sampler(logits[:, :3], [row]).token_ids == [1]
    # repetition penalty divides positive logits of seen tokens (prompt included)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    row = SampleRow(params, 0, 0, (0,), 1)
    assert sampler(logits[:, :3], [row]).token_ids == [1]


def test_logprobs_are_raw_model_logprobs(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True)
    out = llm.generate([[4, 5, 6]], params, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[token].rank == 1  # greedy picks the best token
        assert len(entry) == 3
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]
        assert all(lp.logprob <= 0.0 for lp in entry.values())


def test_stop_strings_and_token_ids(llm: LLM) -> None:
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate([[7, 8, 9]], base, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop_token = full.token_ids[5]
    by_token = llm.generate(
        [[7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token]), use_tqdm=False
    )[0].outputs[0]
    first = full.token_ids.index(stop_token)
    assert by_token.token_ids == full.token_ids[: first + 1]
    assert by_token.finish_reason == "stop" and by_token.stop_reason == stop_token
    middle = len(full.text) // 2
    start = next(i for i in range(middle, len(full.text)) if not full.text[i].isspace())
    stop_text = full.text[start : start + 2]
    by_text = llm.generate(
        [[7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop_text]), use_tqdm=False
    )[0].outputs[0]
    assert by_text.finish_reason == "stop" and by_text.stop_reason == stop_text
    assert stop_text not in by_text.text
    assert full.text.startswith(by_text.text) and len(by_text.text) < len(full.text)


def test_plain_greedy_rows_take_the_first_largest_bfloat16_logit() -> None:
    # Logits in the model's dtype: rows that only need argmax are sampled without widening them; the tokens are
    # the float32 path's (a greedy row with logprobs takes that path in the same batch).
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=generator).bfloat16()
    logits[1, 10] = logits[1, 20] = logits[1].max() + 1  # a tie: the first index wins
    plain = SamplingParams(temperature=0.0)
    rows = [SampleRow(plain, 0, 0, (), 4) for _ in range(6)]
    sampler = Sampler(eos_token_id=None)
    expected = logits.float().max(dim=-1).indices
    assert sampler(logits, rows).token_ids == expected.tolist()
    assert greedy_tokens(logits).tolist() == expected.tolist() and expected[1] == 10
    with_logprobs = [*rows[:5], SampleRow(SamplingParams(temperature=0.0, logprobs=2), 0, 0, (), 4)]
    result = sampler(logits, with_logprobs)
    assert result.token_ids == expected.tolist() and result.logprobs[5] is not None
