"""Structured outputs' cost: a batch of 32 on the default model, half of it under a JSON schema, against the
same batch unconstrained.

Two workloads:
- ``same-length``: the constrained half writes a schema whose required string is longer than the budget,
  so every request decodes the same number of tokens and the batch keeps its size throughout (the mask's
  own cost);
- ``closing``: a bounded schema that the constrained half completes and stops on (what users see:
  shorter constrained replies, each checked with ``jsonschema``).

Usage: ``.venv/bin/python benchmarks/structured_outputs.py [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema

from hawker import LLM, SamplingParams

LONG = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 400}, "n": {"type": "integer"}},
    "required": ["story", "n"],
    "additionalProperties": False,
}
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
BATCH = 32
MAX_TOKENS = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    llm = LLM()
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Describe person number {i} as JSON."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(BATCH)
    ]
    free = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=7, ignore_eos=True)
    for workload, schema in (("same-length", LONG), ("closing", BOUNDED)):
        constrained = SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.8, seed=7, structured_outputs={"json": schema}
        )
        llm.generate(prompts[:2], [free, constrained], use_tqdm=False)  # warm-up, and the schema compiled
        for _ in range(args.rounds):
            for mode in ("none", "half"):
                params = [constrained if mode == "half" and i % 2 else free for i in range(BATCH)]
                start = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - start
                tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
                checked = 0
                for i, output in enumerate(outputs):
                    if mode == "half" and i % 2 and output.outputs[0].finish_reason == "stop":
                        jsonschema.validate(json.loads(output.outputs[0].text), schema)
                        checked += 1
                print(
                    f"{workload:11s} {mode:4s}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s"
                    f"{f', {checked}/16 constrained replies complete and valid' if mode == 'half' else ''}",
                    flush=True,
                )
    stats = llm.engine.grammars.stats
    print(
        f"grammars compiled {stats.compiled} in {stats.compile_seconds:.2f} s (the one-time tokenizer wrap not counted)"
    )


if __name__ == "__main__":
    main()
