"""The JSON-schema set (benchmarks/json_schemas.json) on the default model: every output checked with
``jsonschema``, each schema's compile time, and the unsupported schemas' refusals.

For each schema the model is asked (chat template, greedy) to fill it; the request is constrained by the
schema. An output counts as valid when it parses and ``jsonschema`` (with format checks) accepts it.
Compile time is llguidance's build of the schema's grammar, measured on a fresh compiler (the tokenizer
is wrapped once beforehand and not counted). The unsupported schemas must be refused with a message that
names their keyword.

Usage: ``.venv/bin/python benchmarks/schema_set.py [--max-tokens 384] [--schemas benchmarks/json_schemas.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jsonschema

from hawker import LLM, SamplingParams, StructuredOutputsParams
from hawker.structured.grammars import GrammarCompiler

HERE = Path(__file__).parent


def compile_times(llm: LLM, schemas: list[dict[str, Any]]) -> list[float]:
    engine = llm.engine
    compiler = GrammarCompiler(engine.tokenizer, engine.config.model.vocab_size, engine.eos_token_id)
    compiler.check(StructuredOutputsParams(regex="x"))  # wraps the tokenizer once
    times = []
    for entry in schemas:
        start = time.perf_counter()
        compiler.check(StructuredOutputsParams(json=entry["schema"]))
        times.append(time.perf_counter() - start)
    return times


def validation_error(schema: dict[str, Any], text: str) -> str | None:
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as error:
        return f"not JSON: {error}"
    validator = jsonschema.validators.validator_for(schema)
    errors = list(validator(schema, format_checker=validator.FORMAT_CHECKER).iter_errors(instance))
    return errors[0].message if errors else None


def refusals(llm: LLM, unsupported: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(name, message, names its keyword) of each schema the library should refuse."""
    found = []
    for entry in unsupported:
        try:
            llm.engine.grammars.check(StructuredOutputsParams(json=entry["schema"]))
            found.append((entry["name"], "ACCEPTED", False))
        except ValueError as error:
            found.append((entry["name"], str(error), f'"{entry["keyword"]}"' in str(error)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=Path, default=HERE / "json_schemas.json")
    parser.add_argument("--max-tokens", type=int, default=384)
    args = parser.parse_args()
    data = json.loads(args.schemas.read_text())
    schemas, unsupported = data["schemas"], data["unsupported"]
    llm = LLM()
    times = compile_times(llm, schemas)
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write an example {entry['name'].replace('_', ' ')} as JSON."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for entry in schemas
    ]
    params = [
        SamplingParams(max_tokens=args.max_tokens, temperature=0.0, structured_outputs={"json": entry["schema"]})
        for entry in schemas
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    valid = 0
    for entry, output in zip(schemas, outputs, strict=True):
        completion = output.outputs[0]
        problem = validation_error(entry["schema"], completion.text)
        valid += problem is None
        status = "valid" if problem is None else f"INVALID ({problem})"
        print(f"{entry['name']:32s} {completion.finish_reason:6s} {len(completion.token_ids):4d} tok  {status}")
    print(f"\n{valid}/{len(schemas)} outputs validate ({seconds:.1f} s for the batch, max_tokens {args.max_tokens})")
    ms = sorted(t * 1000 for t in times)
    print(f"compile time: median {statistics.median(ms):.2f} ms, worst {ms[-1]:.2f} ms over {len(ms)} schemas")
    refused = refusals(llm, unsupported)
    named = sum(ok for _, _, ok in refused)
    print(f"\nunsupported: {named}/{len(refused)} refused naming their keyword")
    for name, message, ok in refused:
        print(f"  {'ok ' if ok else 'BAD'} {name}: {message[:160]}")


if __name__ == "__main__":
    main()
