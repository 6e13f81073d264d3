"""`hawker bench throughput`: offline throughput on the standard workload."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from hawker.bench.workload import WorkloadSpec, make_workload
from hawker.llm import LLM
from hawker.sampling_params import SamplingParams


@dataclass(frozen=True)
class ThroughputResult:
    engine: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    seconds: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.seconds

    def summary(self) -> str:
        return (
            f"{self.engine}: {self.num_requests} requests, {self.input_tokens} prompt + "
            f"{self.output_tokens} output tokens in {self.seconds:.1f} s -> "
            f"{self.output_tokens_per_s:.1f} output tok/s, "
            f"{self.total_tokens_per_s:.1f} total tok/s"
        )

    def to_json(self) -> str:
        data = asdict(self) | {
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
        }
        return json.dumps(data)


def run_hawker(llm: LLM, spec: WorkloadSpec) -> ThroughputResult:
    tokenizer = llm.get_tokenizer()
    items = make_workload(spec, llm.engine.config.model.vocab_size, set(tokenizer.all_special_ids))
    prompts = [item.prompt_token_ids for item in items]
    params = [SamplingParams(temperature=0.0, max_tokens=item.output_len, ignore_eos=True) for item in items]
    # Warm up allocator and kernels outside the timed region.
    llm.generate([prompts[0]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return ThroughputResult(
        engine="hawker",
        num_requests=len(items),
        input_tokens=sum(len(p) for p in prompts),
        output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs),
        seconds=seconds,
    )
