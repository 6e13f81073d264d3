"""In-place weight updates (RL weight sync): parity with transformers on the updated model.

Tolerance: test_parity's (float32; max |diff| <= 1e-4 x the logit scale at
every position, identical greedy tokens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hawker import LLM, SamplingParams
from tests.support.parity import assert_parity, make_prompts, reference_generate, run_hawker
from tests.support.weights import perturbed_weights


@pytest.mark.parametrize("only", [None, "layers.1."])
def test_updated_weights_match_transformers_and_drop_stale_prefixes(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, only: str | None
) -> None:
    source = tiny_checkpoints["llama"]
    prompts = make_prompts(seed=9)[1:4]
    llm = LLM(str(source), dtype="float32", block_size=4)
    before = reference_generate(source, prompts)
    assert_parity(before, *run_hawker(llm, prompts))  # the prompts' blocks are now in the prefix cache
    changed = perturbed_weights(source, tmp_path / "trained", only)
    assert llm.update_weights(changed.items()) == 1
    after = reference_generate(tmp_path / "trained", prompts)
    assert after.tokens != before.tokens
    hits_before = llm.engine.stats().prefix_cache_hits
    # Stale KV from the cached prompts would break parity here.
    assert_parity(after, *run_hawker(llm, prompts))
    assert llm.engine.stats().prefix_cache_hits == hits_before
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.weight_version == 1
    llm.engine.kv.check_invariants()


def test_update_from_a_safetensors_directory(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_checkpoints["qwen3"]
    prompts = make_prompts(seed=4)[:2]
    llm = LLM(str(source), dtype="float32")
    perturbed_weights(source, tmp_path / "trained")
    assert llm.update_weights(tmp_path / "trained") == 1
    assert_parity(reference_generate(tmp_path / "trained", prompts), *run_hawker(llm, prompts))


def test_a_bad_update_changes_nothing(tiny_checkpoints: dict[str, Path]) -> None:
    source = tiny_checkpoints["llama"]
    llm = LLM(str(source), dtype="float32")
    prompts = make_prompts(seed=2)[:1]
    reference = reference_generate(source, prompts)
    good = torch.zeros(64, 64)
    with pytest.raises(ValueError, match="shape"):
        llm.update_weights([("model.layers.0.self_attn.o_proj.weight", good), ("model.norm.weight", torch.ones(3))])
    with pytest.raises(ValueError, match="does not match"):
        llm.update_weights([("model.layers.0.mlp.nonexistent.weight", good)])
    assert llm.weight_version == 0
    assert_parity(reference, *run_hawker(llm, prompts))


def test_pause_keep_update_resume_and_sleep_wake(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    source = tiny_checkpoints["llama"]
    prompts = make_prompts(seed=6)[:2]
    llm = LLM(str(source), dtype="float32")
    engine = llm.engine
    engine.add_request("kept", prompts[0], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert llm.pause_generation(mode="keep") == []
    assert engine.step() == [] and engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="paused"):
        llm.generate([prompts[1]], SamplingParams(max_tokens=2), use_tqdm=False)
    changed = perturbed_weights(source, tmp_path / "trained")
    llm.update_weights(changed.items())
    llm.resume_generation()
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert outputs[0].finished and outputs[0].weight_version == 1
    # Abort mode ends what is in flight and returns every block.
    engine.add_request("aborted", prompts[1], SamplingParams(max_tokens=4))
    (final,) = llm.pause_generation(mode="abort")
    assert final.outputs[0].finish_reason == "abort" and engine.kv.usage == 0
    llm.resume_generation()
    # Sleep level 1 keeps the (updated) weights; level 2 drops them and wakes with the checkpoint's.
    after = reference_generate(tmp_path / "trained", prompts)
    llm.sleep(level=1)
    assert all(k.untyped_storage().nbytes() == 0 for k, _ in engine.runner.kv_caches)
    llm.wake_up()
    assert_parity(after, *run_hawker(llm, prompts))
    llm.sleep(level=2)
    assert all(p.untyped_storage().nbytes() == 0 for p in engine.runner.model.parameters())
    llm.wake_up()
    assert_parity(reference_generate(source, prompts), *run_hawker(llm, prompts))
    assert llm.weight_version == 2
