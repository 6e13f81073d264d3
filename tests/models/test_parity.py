"""Logit parity with transformers on tiny random-weight models (float32).

Tolerance: at every generated position, max |hawker - transformers| over the
vocabulary must be <= 1e-4 * max |transformers logits| of that position
(relative to the logit scale), and greedy tokens must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hawker import LLM, SamplingParams
from hawker.attention import torch_metadata
from tests.support.parity import (
    NUM_NEW_TOKENS,
    Reference,
    assert_parity,
    assert_pool_full,
    make_prompts,
    reference_generate,
    run_hawker,
)
from tests.support.tiny_models import ARCHITECTURES


@pytest.fixture(scope="module")
def references(tiny_checkpoints: dict[str, Path]) -> dict[str, Reference]:
    prompts = make_prompts()
    return {arch: reference_generate(path, prompts) for arch, path in tiny_checkpoints.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_parity(arch: str, tiny_checkpoints: dict[str, Path], references: dict[str, Reference]) -> None:
    llm = LLM(str(tiny_checkpoints[arch]), dtype="float32")
    tokens, logits = run_hawker(llm, references[arch].prompts)
    assert_parity(references[arch], tokens, logits)
    assert_pool_full(llm)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parity_with_chunked_prefill(
    arch: str, tiny_checkpoints: dict[str, Path], references: dict[str, Reference]
) -> None:
    # A 16-token budget splits every prompt longer than 16 into chunks, and
    # mixes those chunks with the decodes of other requests.
    llm = LLM(str(tiny_checkpoints[arch]), dtype="float32", max_num_batched_tokens=16, block_size=4)
    tokens, logits = run_hawker(llm, references[arch].prompts)
    assert_parity(references[arch], tokens, logits)
    assert_pool_full(llm)


def test_parity_with_decode_groups(
    tiny_checkpoints: dict[str, Path], references: dict[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With groups of any size allowed, the 8 prompts (3..64 tokens) decode in
    # several length groups per step; the result must not change.
    monkeypatch.setattr(torch_metadata, "DECODE_GROUP_MIN_ROWS", 1)
    group_counts: list[int] = []
    original = torch_metadata.TorchAttentionBackend._decode_groups

    def spy(self, decodes):  # type: ignore[no-untyped-def]
        groups = original(self, decodes)
        group_counts.append(len(groups))
        return groups

    monkeypatch.setattr(torch_metadata.TorchAttentionBackend, "_decode_groups", spy)
    # The padded-SDPA path, which the in-place C kernel replaces where it builds.
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", native_decode_attention=False)
    tokens, logits = run_hawker(llm, references["llama"].prompts)
    assert max(group_counts) >= 3
    assert_parity(references["llama"], tokens, logits)
    assert_pool_full(llm)


def test_split_by_length_bounds_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    lens = [800, 700, 500, 480, 300, 100, 90, 10, 9]
    monkeypatch.setattr(torch_metadata, "DECODE_GROUP_MIN_ROWS", 2)
    # A new group starts below 60% of the group's longest, once the group has 2 rows.
    assert torch_metadata.split_by_length(lens) == [(0, 4), (4, 2), (6, 2), (8, 1)]
    monkeypatch.setattr(torch_metadata, "DECODE_GROUP_MIN_ROWS", 100)
    assert torch_metadata.split_by_length(lens) == [(0, len(lens))]
    assert torch_metadata.split_by_length([]) == []


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parity_with_prefix_cache_hit(
    arch: str, tiny_checkpoints: dict[str, Path], references: dict[str, Reference]
) -> None:
    ref = references[arch]
    llm = LLM(str(tiny_checkpoints[arch]), dtype="float32", block_size=4)
    # Warm the cache with the longest prompt, then run every prompt: the
    # longest one hits its own cached blocks, and the continuation of a
    # finished request shares its full blocks too.
    llm.generate([ref.prompts[-1]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    hits_before = llm.engine.kv.stats.hit_tokens
    tokens, logits = run_hawker(llm, ref.prompts)
    assert llm.engine.kv.stats.hit_tokens - hits_before >= (len(ref.prompts[-1]) // 4 - 1) * 4
    assert_parity(ref, tokens, logits)
    assert_pool_full(llm)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parity_under_preemption(
    arch: str, tiny_checkpoints: dict[str, Path], references: dict[str, Reference]
) -> None:
    # 26 blocks of 4 tokens: the longest request alone needs 24, so the
    # batch cannot all stay resident and requests are preempted and recomputed.
    llm = LLM(str(tiny_checkpoints[arch]), dtype="float32", block_size=4, num_kv_blocks=26)
    tokens, logits = run_hawker(llm, references[arch].prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_parity(references[arch], tokens, logits)
    assert_pool_full(llm)


def test_n_samples_share_prompt_blocks(tiny_checkpoints: dict[str, Path], references: dict[str, Reference]) -> None:
    ref = references["llama"]
    llm = LLM(str(tiny_checkpoints["llama"]), dtype="float32", block_size=4, enable_prefix_caching=False)
    prompt = ref.prompts[-1]  # 64 tokens = 16 blocks
    scheduled_prompt_tokens = []
    schedule = llm.engine.scheduler.schedule

    def counting_schedule():  # type: ignore[no-untyped-def]
        out = schedule()
        scheduled_prompt_tokens.extend(
            len([p for p in range(s.start_pos, s.start_pos + s.num_tokens) if p < s.num_prompt_tokens])
            for s in out.seqs
        )
        return out

    llm.engine.scheduler.schedule = counting_schedule  # type: ignore[method-assign]
    params = SamplingParams(n=3, temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    for completion in out[0].outputs:
        assert completion.token_ids == ref.tokens[-1]
    # The first sample computes all 64 prompt tokens; each sibling reuses its
    # 15 full blocks (60 tokens) and recomputes only the last 4.
    assert sum(scheduled_prompt_tokens) == 64 + 2 * 4
    assert_pool_full(llm)
