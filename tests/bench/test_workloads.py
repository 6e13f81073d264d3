"""The comparison's named workloads and its peer scripts' contract (with stand-in peers: no vLLM, no llama.cpp)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

from hawker.bench.workload import WORKLOADS, WorkloadSpec, make_workload, shrunk

ROOT = Path(__file__).resolve().parents[2]
SPECIAL = {0, 1, 2}
STANDARD_LENGTHS = [464, 91, 244]  # WorkloadSpec(num_prompts=3) over 1,000 ids, before the presets


def test_standard_workload_is_unchanged_by_the_presets() -> None:
    assert WORKLOADS["standard"] == WorkloadSpec()
    # The standard workload's prompts are those of the runs recorded before the presets.
    items = make_workload(WorkloadSpec(num_prompts=3), 1000, SPECIAL)
    assert items == make_workload(WorkloadSpec(num_prompts=3, shared_prefix=0), 1000, SPECIAL)
    assert [len(item.prompt_token_ids) for item in items] == STANDARD_LENGTHS


def test_presets_respect_their_lengths_and_avoid_special_tokens() -> None:
    for name, spec in WORKLOADS.items():
        items = make_workload(shrunk(spec, 16), 49152, SPECIAL)
        assert len(items) == max(2, spec.num_prompts // 16), name
        for item in items:
            question = len(item.prompt_token_ids) - spec.shared_prefix
            assert spec.min_input <= question <= spec.max_input, name
            assert spec.min_output <= item.output_len <= spec.max_output, name
            assert not SPECIAL & set(item.prompt_token_ids), name


def test_shared_prefix_workload_shares_exactly_its_prefix() -> None:
    spec = WORKLOADS["shared-prefix"]
    items = make_workload(shrunk(spec, 16), 49152, SPECIAL)
    prefixes = {tuple(item.prompt_token_ids[: spec.shared_prefix]) for item in items}
    assert len(prefixes) == 1
    assert len({tuple(item.prompt_token_ids[spec.shared_prefix :]) for item in items}) == len(items)


STAND_INS = {
    "vllm/__init__.py": """
        from types import SimpleNamespace

        class SamplingParams:
            def __init__(self, temperature, max_tokens, ignore_eos):
                assert temperature == 0.0 and ignore_eos
                self.max_tokens = max_tokens

        class LLM:
            def __init__(self, model, dtype, seed):
                assert dtype == "bfloat16"

            def generate(self, prompts, params, use_tqdm):
                assert len(prompts) == len(params) and all(p["prompt_token_ids"] for p in prompts)
                return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5] * p.max_tokens)]) for p in params]
    """,
    "vllm/inputs.py": """
        def TokensPrompt(prompt_token_ids):
            return {"prompt_token_ids": prompt_token_ids}
    """,
    "llama_cpp.py": """
        class Llama:
            def __init__(self, model_path, n_threads, n_threads_batch, n_ctx, n_batch, verbose):
                pass

            def token_eos(self):
                return 2

            def create_completion(self, prompt, max_tokens, temperature, logit_bias):
                assert isinstance(prompt, list) and logit_bias == {2: -100.0}
                return {"usage": {"completion_tokens": max_tokens}}
    """,
}


def _job(tmp_path: Path) -> tuple[Path, dict]:
    workloads = {
        name: make_workload(shrunk(WORKLOADS[name], 64), 49152, SPECIAL) for name in ("standard", "long-outputs")
    }
    job = {
        "workloads": {name: [asdict(item) for item in items] for name, items in workloads.items()},
        "warmup": [{"prompt_token_ids": [5, 6], "output_len": 2}],
        "single_stream": {"prompt_token_ids": [5, 6, 7], "output_len": 16},
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path, job


def _run(tmp_path: Path, script: str, *args: str) -> dict:
    """Run a peer script with the stand-ins importable; returns the JSON it wrote."""
    for name, source in STAND_INS.items():
        (tmp_path / "stand_ins" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stand_ins" / name).write_text(textwrap.dedent(source))
    env = {"PYTHONPATH": str(tmp_path / "stand_ins"), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out.json"
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    subprocess.run([part if part != "OUT" else str(out) for part in command], check=True, env=env)
    return json.loads(out.read_text())


def _check(report: dict, job: dict) -> None:
    assert set(report["workloads"]) == set(job["workloads"])
    for name, items in job["workloads"].items():
        result = report["workloads"][name]
        assert result["num_requests"] == len(items)
        assert result["input_tokens"] == sum(len(item["prompt_token_ids"]) for item in items)
        assert result["output_tokens"] == sum(item["output_len"] for item in items)
        assert result["output_tokens_per_s"] > 0


def test_vllm_script_runs_every_workload_of_the_job(tmp_path: Path) -> None:
    path, job = _job(tmp_path)
    report = _run(tmp_path, "vllm_peer.py", str(path), "OUT", "--model", "dir")
    _check(report, job)
    assert report["single_stream_tok_s"] > 0


def test_llama_cpp_script_runs_every_workload_of_the_job(tmp_path: Path) -> None:
    path, job = _job(tmp_path)
    report = _run(tmp_path, "llamacpp_offline.py", "model.gguf", str(path), "OUT", "--budget-s", "60")
    _check(report, job)
    # Past its budget a workload stops starting requests (a zero budget: one request each).
    report = _run(tmp_path, "llamacpp_offline.py", "model.gguf", str(path), "OUT", "--budget-s", "0")
    assert all(result["num_requests"] == 1 for result in report["workloads"].values())
