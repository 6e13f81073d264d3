"""Greedy consistency on the default model (issue 18): is the same greedy request answered the same way?

Server mode (default) starts ``hawker serve`` with its defaults (plus any extra flags given after
``--``) and sends 10 chat prompts at temperature 0, each
  cold      the first time the server sees it,
  cached    again, after its prefix is in the cache,
  n=4       as one request with four choices,
  streamed  as a stream, its deltas joined,
  16 concurrent  among 16 requests in flight at once (the 10 prompts and 6 repeats), 3 rounds,
and prints the share of texts identical to the cold one for each case.

``--deterministic`` instead checks batch invariance offline (``LLM(deterministic=True)``): every
prompt alone, all prompts in one batch, in reverse order and as n=3, compared bitwise (tokens and
logprobs).

    .venv/bin/python benchmarks/greedy_consistency.py [-- --no-consistent-numerics]
    .venv/bin/python benchmarks/greedy_consistency.py --deterministic
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Give me a tip for learning Python.",
    "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Name a famous painting and its painter.",
]
MAX_TOKENS = 64
ROUNDS = 3
CONCURRENT = 16


def _body(prompt: str, **extra: object) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        **extra,
    }


async def _chat(client: httpx.AsyncClient, prompt: str, **extra: object) -> list[str]:
    response = await client.post("/v1/chat/completions", json=_body(prompt, **extra))
    response.raise_for_status()
    return [choice["message"]["content"] for choice in response.json()["choices"]]


async def _streamed(client: httpx.AsyncClient, prompt: str) -> str:
    parts: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=_body(prompt, stream=True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


async def _measure(base_url: str) -> dict[str, tuple[int, int]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        cold = {p: (await _chat(client, p))[0] for p in PROMPTS}
        counts: dict[str, tuple[int, int]] = {}
        cached = [(await _chat(client, p))[0] == cold[p] for p in PROMPTS]
        counts["cached"] = (sum(cached), len(cached))
        choices = [text == cold[p] for p in PROMPTS for text in await _chat(client, p, n=4)]
        counts["n=4 (choices)"] = (sum(choices), len(choices))
        streamed = [await _streamed(client, p) == cold[p] for p in PROMPTS]
        counts["streamed"] = (sum(streamed), len(streamed))
        together: list[bool] = []
        for round_index in range(ROUNDS):
            batch = [PROMPTS[(round_index + i) % len(PROMPTS)] for i in range(CONCURRENT)]
            texts = await asyncio.gather(*(_chat(client, p) for p in batch))
            together += [t[0] == cold[p] for p, t in zip(batch, texts, strict=True)]
        counts[f"{CONCURRENT} concurrent"] = (sum(together), len(together))
        return counts


def _wait_ready(process: subprocess.Popen, base_url: str, log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("the server did not become healthy in 600 s")


def run_server_check(port: int, extra_flags: list[str]) -> None:
    log = Path(tempfile.mkstemp(prefix="hawker-consistency-", suffix=".log")[1])
    command = [
        sys.executable,
        "-m",
        "hawker.cli",
        "serve",
        "--port",
        str(port),
        "--compile-warmup",
        "blocking",
        *extra_flags,
    ]
    base_url = f"http://127.0.0.1:{port}"
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"}
        )
    try:
        _wait_ready(process, base_url, log)
        counts = asyncio.run(_measure(base_url))
    finally:
        process.terminate()
        process.wait(60)
    print(f"hawker serve {' '.join(extra_flags) or '(defaults)'}: texts identical to the cold one")
    for case, (same, total) in counts.items():
        print(f"  {case:16s} {same}/{total}")


def run_deterministic_check() -> None:
    from hawker import LLM, SamplingParams

    llm = LLM(deterministic=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]

    def fingerprints(outputs: list) -> list:  # type: ignore[type-arg]
        return [
            (tuple(c.token_ids), tuple(tuple(sorted((t, lp.logprob) for t, lp in e.items())) for e in c.logprobs))
            for o in outputs
            for c in o.outputs
        ]

    alone = [fingerprints(llm.chat([c], params, use_tqdm=False))[0] for c in conversations]
    batch = fingerprints(llm.chat(conversations, params, use_tqdm=False))
    reverse = fingerprints(llm.chat(conversations[::-1], params, use_tqdm=False))[::-1]
    three = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2, n=3)
    with_n = fingerprints(llm.chat(conversations, three, use_tqdm=False))
    print("deterministic=True, bitwise equal (tokens and logprobs) to each prompt run alone:")
    print(f"  all 10 in one batch   {sum(a == b for a, b in zip(alone, batch, strict=True))}/10")
    print(f"  reversed batch        {sum(a == b for a, b in zip(alone, reverse, strict=True))}/10")
    print(f"  batch with n=3        {sum(with_n[3 * i + k] == alone[i] for i in range(10) for k in range(3))}/30")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--deterministic", action="store_true", help="check batch invariance offline instead")
    parser.add_argument("serve_flags", nargs="*", help="extra `hawker serve` flags (after --)")
    args = parser.parse_args()
    if args.deterministic:
        run_deterministic_check()
    else:
        run_server_check(args.port, args.serve_flags)


if __name__ == "__main__":
    main()
