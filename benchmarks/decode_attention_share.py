"""Issue 19's target 4: decode attention's share of a decode step of 48 running requests, contexts 32-400.

48 random-token prompts of 32-336 tokens (fixed seed), greedy, ``ignore_eos``, 64 new tokens each, are
added to the default model's engine (bfloat16, defaults: the compiled decode step included). Once every
prompt has been prefilled, ``--steps`` decode steps are timed plain, then as many under torch.profiler, whose
``hawker::paged_decode_attention`` self time per step is set against the profiled step's time.

    .venv/bin/python benchmarks/decode_attention_share.py [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hawker import LLM, SamplingParams
from hawker.bench.workload import WorkloadSpec, make_workload
from hawker.engine.engine import Engine

NEW_TOKENS = 64
WORKLOAD = WorkloadSpec(num_prompts=48, min_input=32, max_input=336, min_output=NEW_TOKENS, max_output=NEW_TOKENS)
ATTENTION_OP = "hawker::paged_decode_attention"


def add_requests(engine: Engine) -> int:
    """The prompts, queued; returns their tokens."""
    tokenizer = engine.tokenizer
    items = make_workload(WORKLOAD, len(tokenizer), set(tokenizer.all_special_ids))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for index, item in enumerate(items):
        engine.add_request(f"r{index}", item.prompt_token_ids, params)
    return sum(len(item.prompt_token_ids) for item in items)


def timed_steps(engine: Engine, steps: int) -> float:
    """Seconds per step over ``steps`` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed plain, then as many profiled")
    args = parser.parse_args()
    if 2 * args.steps + 8 > NEW_TOKENS:
        sys.exit(f"at most {(NEW_TOKENS - 8) // 2} steps: every request must still be decoding")
    engine = LLM(dtype="bfloat16").engine
    prompt_tokens = add_requests(engine)
    while engine.stats().prompt_tokens < prompt_tokens:
        engine.step()
    engine.step()  # the last prompt's first decode
    running = engine.stats().num_running
    plain = timed_steps(engine, args.steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = timed_steps(engine, args.steps)
    attention = sum(event.self_cpu_time_total for event in prof.key_averages() if event.key == ATTENTION_OP)
    attention_per_step = attention / 1e6 / args.steps
    print(
        f"{running} running requests, {args.steps} steps each way: step {plain * 1e3:.1f} ms plain, "
        f"{profiled * 1e3:.1f} ms profiled; decode attention {attention_per_step * 1e3:.2f} ms a step = "
        f"{attention_per_step / profiled:.1%} of the profiled step"
    )


if __name__ == "__main__":
    main()
