"""Hawker vs Hugging Face transformers on the standard offline workload, in one run.

transformers runs `generate` with left padding in bfloat16 with static
batches; its batch size is picked among 8/16/32/64 by timing one batch of
each on the head of the workload, then the whole workload runs at the best
one. Both engines produce exactly each request's output length (ignore_eos /
min_new_tokens), and only those tokens are counted.

    .venv/bin/python benchmarks/compare_transformers.py [--num-prompts 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hawker import LLM
from hawker.bench.throughput import ThroughputResult, run_hawker
from hawker.bench.workload import WorkItem, WorkloadSpec, make_workload
from hawker.loader.checkpoint import default_model_path, open_checkpoint

BATCH_SIZES = (8, 16, 32, 64)


def hf_generate_batch(model: torch.nn.Module, items: list[WorkItem], pad_id: int, device: str = "cpu") -> int:
    """Generate one left-padded static batch; returns the tokens the requests asked for."""
    width = max(len(item.prompt_token_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, width - len(item.prompt_token_ids) :] = torch.tensor(item.prompt_token_ids)
        mask[row, width - len(item.prompt_token_ids) :] = 1
    longest = max(item.output_len for item in items)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad_id,
        )
    assert out.shape[1] - width == longest
    # A static batch runs until its longest request is done; each request
    # only counts the tokens it asked for.
    return sum(item.output_len for item in items)


def run_transformers(items: list[WorkItem], batch_size: int, pad_id: int) -> ThroughputResult:
    model = _load_hf_model()
    hf_generate_batch(model, items[:2], pad_id)  # warm-up
    start = time.perf_counter()
    produced = 0
    for first in range(0, len(items), batch_size):
        produced += hf_generate_batch(model, items[first : first + batch_size], pad_id)
    seconds = time.perf_counter() - start
    return ThroughputResult(
        engine=f"transformers (batch {batch_size})",
        num_requests=len(items),
        input_tokens=sum(len(item.prompt_token_ids) for item in items),
        output_tokens=produced,
        seconds=seconds,
    )


def pick_batch_size(items: list[WorkItem], pad_id: int) -> dict[int, float]:
    """Output tokens/s of one batch of each size, on the head of the workload.

    Sizes are tried in increasing order; once a size is under half the best
    rate so far, larger ones (each a longer batch, padded to its longest
    prompt and output) are not timed: on a 2-core CPU one batch of 64 takes
    tens of minutes at that point.
    """
    model = _load_hf_model()
    hf_generate_batch(model, items[:2], pad_id)
    rates: dict[int, float] = {}
    for size in BATCH_SIZES:
        start = time.perf_counter()
        produced = hf_generate_batch(model, items[:size], pad_id)
        rates[size] = produced / (time.perf_counter() - start)
        print(f"  transformers calibration: batch {size}: {rates[size]:.1f} output tok/s", flush=True)
        if rates[size] < 0.5 * max(rates.values()):
            print(f"  transformers calibration: stopping, batch {size} is under half the best rate", flush=True)
            break
    return rates


def _load_hf_model() -> torch.nn.Module:
    """The default model as a plain bfloat16 transformers Llama.

    transformers' own GGUF loading keeps Q4_1 weights packed and runs its
    dequantising float32 kernels; to measure transformers in bfloat16 the
    dequantised tensors are loaded into a regular LlamaForCausalLM instead.
    """
    checkpoint = open_checkpoint(default_model_path())
    config = AutoConfig.for_model("llama", **{k: v for k, v in checkpoint.hf_config.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {name: tensor.to(torch.bfloat16) for name, tensor in checkpoint.weights()}
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="skip calibration and use this batch size")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    spec = WorkloadSpec(num_prompts=args.num_prompts, seed=args.seed)
    llm = LLM(dtype="bfloat16")
    tokenizer = llm.get_tokenizer()
    items = make_workload(spec, llm.engine.config.model.vocab_size, set(tokenizer.all_special_ids))
    hawker = run_hawker(llm, spec)
    print(hawker.summary(), flush=True)
    del llm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rates = {} if args.batch_size else pick_batch_size(items, pad_id)
    batch_size = args.batch_size or max(rates, key=rates.__getitem__)
    reference = run_transformers(items, batch_size, pad_id)
    print(reference.summary())
    ratio = hawker.output_tokens_per_s / reference.output_tokens_per_s
    print(f"ratio hawker / transformers (output tok/s): {ratio:.2f}x")
    if args.json_out:
        results = [json.loads(hawker.to_json()), json.loads(reference.to_json())]
        args.json_out.write_text(json.dumps({"results": results, "ratio": ratio, "calibration": rates}, indent=2))


if __name__ == "__main__":
    main()
