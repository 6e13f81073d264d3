"""RL on Ray: a trainer actor and two Hawker rollout-engine actors, weights synced over a process group.

    .venv/bin/python examples/ray_rl.py                         # a local Ray cluster, 10 steps
    .venv/bin/python examples/ray_rl.py --sync object-store     # weights as tensors through Ray's object store
    .venv/bin/python examples/ray_rl.py --address auto          # an existing cluster (ray start --head ...)

The task and the policy are examples/grpo.py's (a tiny Llama learning to
answer ``a + b =`` as ``< d >``). Each step the driver splits the prompts
between the two ``hawker.ray.RolloutEngine`` actors, the trainer actor
takes one GRPO step on their samples, then sends its new weights to both
engines: with ``--sync group`` (the default) over a collective group that
the trainer (rank 0) and the engines (ranks 1, 2) joined once, one
broadcast per tensor (hawker/ray/weight_sync.py); with ``--sync
object-store`` as one ``ray.put`` of the state dict (``PackedWeights``: raw
bytes that every engine reads in place). Every output carries
the weight version it was sampled with, checked against the step here.

Printed per step: mean reward, the whole weight sync as the trainer sees
it, and the part of it spent writing into the engines (what an in-process
``LLM.update_weights`` costs, as in examples/grpo.py); and the largest gap
between the engines' logprobs and the trainer's recomputation, which stays
at rounding level only if every engine holds the trainer's weights.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import LlamaForCausalLM

from hawker import RequestOutput, SamplingParams
from hawker.distributed.launch import free_port
from hawker.ray import PackedWeights, RolloutEngine, WeightSyncGroup, weight_specs

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))
from grpo import ANSWER_TOKENS, build_policy, make_prompt, reward, sequence_logprobs  # noqa: E402


class Trainer:
    """The policy in plain torch: one GRPO step on a batch of rollouts, then its weights to the engines."""

    def __init__(self, policy_dir: str, lr: float) -> None:
        self.model = LlamaForCausalLM.from_pretrained(policy_dir, torch_dtype=torch.float32).eval()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.group: WeightSyncGroup | None = None

    def sync_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def join_weight_sync(self, host: str, port: int, world_size: int) -> None:
        self.group = WeightSyncGroup(host, port, 0, world_size)

    def train(self, batch: dict[str, Any]) -> float:
        """One policy-gradient step with group-normalised advantages; returns the largest gap between the
        engines' logprobs (taken before the step) and the trainer's."""
        rewards = torch.tensor(batch["rewards"]).view(-1, batch["group_size"])
        advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
        self.model.train()
        token_lps = sequence_logprobs(self.model, batch["prompts"], batch["completions"])
        mismatch = (token_lps.detach() - torch.tensor(batch["engine_logprobs"])).abs().max().item()
        loss = -(advantages * token_lps.sum(1)).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.model.eval()
        return mismatch

    def sync(self, engines: list[Any], how: str) -> tuple[float, list[int]]:
        """Send the weights to every engine; returns the seconds it took and the engines' new versions."""
        start = time.perf_counter()
        state = {name: tensor.detach() for name, tensor in self.model.state_dict().items()}
        if how == "group":
            assert self.group is not None
            received = [engine.receive_weights.remote(weight_specs(state.items())) for engine in engines]
            self.group.send(state.items())
        else:
            shared = ray.put(PackedWeights.of(state.items()))  # read in place by every engine
            received = [engine.update_weights.remote(shared) for engine in engines]
        versions = ray.get(received)
        return time.perf_counter() - start, versions


def rollouts(
    engines: list[Any], rng: random.Random, args: argparse.Namespace, step: int
) -> tuple[dict[str, Any], float]:
    """Sample a group per prompt, the prompts split between the engines; returns the batch and mean reward."""
    tasks = [make_prompt(rng) for _ in range(args.prompts_per_step)]
    params = SamplingParams(
        n=args.group_size, temperature=1.0, max_tokens=ANSWER_TOKENS, ignore_eos=True, logprobs=0, seed=step
    )
    shares = [tasks[i :: len(engines)] for i in range(len(engines))]
    calls = [
        engine.generate.remote([ids for ids, _ in share], params) for engine, share in zip(engines, shares, strict=True)
    ]
    outputs: list[list[RequestOutput]] = ray.get(calls)
    batch: dict[str, Any] = {"prompts": [], "completions": [], "rewards": [], "engine_logprobs": []}
    for share, share_outputs in zip(shares, outputs, strict=True):
        for (ids, answer), output in zip(share, share_outputs, strict=True):
            if output.weight_version != step:
                raise RuntimeError(f"step {step} sampled with weight version {output.weight_version}")
            for completion in output.outputs:
                tokens = list(completion.token_ids)
                assert completion.logprobs is not None
                batch["prompts"].append(ids)
                batch["completions"].append(tokens)
                batch["rewards"].append(reward(tokens, answer))
                batch["engine_logprobs"].append(
                    [e[t].logprob for t, e in zip(tokens, completion.logprobs, strict=True)]
                )
    batch["group_size"] = args.group_size
    return batch, sum(batch["rewards"]) / len(batch["rewards"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sync", choices=("group", "object-store"), default="group")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    args = parser.parse_args()
    engines_count = 2
    # The actors import grpo.py's task from this folder; a local cluster gets one CPU per actor.
    runtime_env = {"env_vars": {"PYTHONPATH": str(EXAMPLES)}}
    ray.init(address=args.address, num_cpus=None if args.address else engines_count + 1, runtime_env=runtime_env)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="hawker-ray-rl-") as policy_dir:
        build_policy(Path(policy_dir), args.seed)
        trainer = ray.remote(Trainer).options(num_cpus=1).remote(policy_dir, args.lr)
        options = {"dtype": "float32", "max_model_len": 16, "compile_decode_max_rows": 0, "seed": args.seed}
        engine_actor = ray.remote(RolloutEngine).options(num_cpus=1)
        engines = [engine_actor.remote(policy_dir, **options) for _ in range(engines_count)]
        if args.sync == "group":
            host, port = ray.get(trainer.sync_address.remote())
            joined = [e.join_weight_sync.remote(host, port, i + 1, engines_count + 1) for i, e in enumerate(engines)]
            ray.get([trainer.join_weight_sync.remote(host, port, engines_count + 1), *joined])
        run_steps(trainer, engines, rng, args)
        ray.get([engine.close.remote() for engine in engines])
    ray.shutdown()


def run_steps(trainer: Any, engines: list[Any], rng: random.Random, args: argparse.Namespace) -> None:
    sync_total = write_total = 0.0
    worst_mismatch = 0.0
    for step in range(args.steps):
        batch, mean_reward = rollouts(engines, rng, args, step)
        worst_mismatch = max(worst_mismatch, ray.get(trainer.train.remote(batch)))
        sync_s, versions = ray.get(trainer.sync.remote(engines, args.sync))
        if versions != [step + 1] * len(engines):
            raise RuntimeError(f"after step {step} the engines report weight versions {versions}")
        write_s = max(ray.get([engine.update_seconds.remote() for engine in engines]))
        sync_total += sync_s
        write_total += write_s
        print(
            f"step {step:2d}: mean reward {mean_reward:.3f}, weight sync ({args.sync}) {sync_s * 1000:.1f} ms, "
            f"of which writing into the engines {write_s * 1000:.1f} ms",
            flush=True,
        )
    print(
        f"weight sync per step ({args.sync}, {len(engines)} engines): {sync_total / args.steps * 1000:.1f} ms; "
        f"in-process update (writing into an engine): {write_total / args.steps * 1000:.1f} ms"
    )
    print(f"largest |engine logprob - trainer logprob|: {worst_mismatch:.2e}")


if __name__ == "__main__":
    main()
