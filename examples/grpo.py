"""GRPO with Hawker as the rollout engine: a small model learns an answer format and a sum.

    .venv/bin/python examples/grpo.py                 # 100 steps, about 10 s on a 2-core CPU
    .venv/bin/python examples/grpo.py --steps 300 --plot reward.png

Task: a prompt ``a + b =`` (single digits) must be answered ``< d >`` with
d = (a + b) mod 10. Reward: 0.2 for "<" first, 0.2 for ">" third, 0.6 for
the right digit between them. The policy is a tiny Llama trained from
scratch (random weights, built from a config: nothing is downloaded).

Each step: Hawker samples a group of completions per prompt (temperature 1,
so its logprobs are the policy's own), the trainer (plain torch on a
transformers model) takes one policy-gradient step with group-normalised
advantages (GRPO without a KL term), and the new weights go to Hawker in
place with ``update_weights(model.state_dict().items())``. The script
prints the time split between rollout, training and weight sync, the
largest gap between Hawker's logprobs and the trainer's recomputation, and
saves the reward curve. In 100 steps the policy learns the format (mean
reward 0.08 -> 0.40) but not the sum: its outputs stop varying within a
group, which leaves GRPO no signal (a KL or entropy term would be the next
thing to try).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hawker import LLM, SamplingParams

WORDS = ["<pad>", "<s>", "</s>", *"0123456789", "+", "=", "<", ">"]
VOCAB = {word: index for index, word in enumerate(WORDS)}
ANSWER_TOKENS = 3


@dataclass(frozen=True)
class Timing:
    rollout_s: float = 0.0
    train_s: float = 0.0
    sync_s: float = 0.0
    rollout_tokens: int = 0


def build_policy(directory: Path, seed: int) -> LlamaForCausalLM:
    """A tiny random Llama and a word-level tokenizer over the task's symbols, saved for Hawker to load."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return model


def make_prompt(rng: random.Random) -> tuple[list[int], int]:
    a, b = rng.randrange(10), rng.randrange(10)
    ids = [VOCAB["<s>"], VOCAB[str(a)], VOCAB["+"], VOCAB[str(b)], VOCAB["="]]
    return ids, (a + b) % 10


def reward(tokens: list[int], answer: int) -> float:
    got = [*tokens, -1, -1, -1][:ANSWER_TOKENS]
    score = 0.2 * (got[0] == VOCAB["<"]) + 0.2 * (got[2] == VOCAB[">"])
    return score + 0.6 * (got[1] == VOCAB[str(answer)])


def sequence_logprobs(model: LlamaForCausalLM, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    """The trainer's log p(completion | prompt) summed per sequence (prompts here all have one length)."""
    sequences = torch.tensor([p + c for p, c in zip(prompts, completions, strict=True)])
    logits = model(sequences).logits[:, len(prompts[0]) - 1 : -1].float()
    targets = sequences[:, len(prompts[0]) :]
    return torch.log_softmax(logits, dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)


def grpo_step(
    llm: LLM,
    model: LlamaForCausalLM,
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    args: argparse.Namespace,
    step: int,
) -> tuple[float, float, Timing]:
    tasks = [make_prompt(rng) for _ in range(args.prompts_per_step)]
    params = SamplingParams(
        n=args.group_size, temperature=1.0, max_tokens=ANSWER_TOKENS, ignore_eos=True, logprobs=0, seed=step
    )
    start = time.perf_counter()
    outputs = llm.generate([ids for ids, _ in tasks], params, use_tqdm=False)
    rollout_s = time.perf_counter() - start
    prompts, completions, rewards, engine_lps = [], [], [], []
    for (ids, answer), output in zip(tasks, outputs, strict=True):
        for completion in output.outputs:
            prompts.append(ids)
            completions.append(list(completion.token_ids))
            rewards.append(reward(list(completion.token_ids), answer))
            assert completion.logprobs is not None
            engine_lps.append([e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True)])
    grouped = torch.tensor(rewards).view(args.prompts_per_step, args.group_size)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()

    start = time.perf_counter()
    model.train()
    token_lps = sequence_logprobs(model, prompts, completions)
    mismatch = (token_lps.detach() - torch.tensor(engine_lps)).abs().max().item()
    loss = -(advantages * token_lps.sum(1)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    llm.update_weights(model.state_dict().items())
    sync_s = time.perf_counter() - start
    produced = sum(len(c) for c in completions)
    return float(grouped.mean()), mismatch, Timing(rollout_s, train_s, sync_s, produced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/grpo_reward.png"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="hawker-grpo-") as tmp:
        model = build_policy(Path(tmp), args.seed).eval()
        # float32 like the trainer, so Hawker's logprobs are the trainer's (up to rounding).
        llm = LLM(tmp, dtype="float32", max_model_len=16, compile_decode_max_rows=0, seed=args.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        curve: list[float] = []
        total = Timing()
        worst_mismatch = 0.0
        for step in range(args.steps):
            mean_reward, mismatch, timing = grpo_step(llm, model, optimizer, rng, args, step)
            curve.append(mean_reward)
            worst_mismatch = max(worst_mismatch, mismatch)
            total = Timing(
                total.rollout_s + timing.rollout_s,
                total.train_s + timing.train_s,
                total.sync_s + timing.sync_s,
                total.rollout_tokens + timing.rollout_tokens,
            )
            if step % 10 == 0 or step == args.steps - 1:
                print(f"step {step:3d}: mean reward {mean_reward:.3f}", flush=True)
    report(curve, total, worst_mismatch, args)


def report(curve: list[float], total: Timing, worst_mismatch: float, args: argparse.Namespace) -> None:
    window = max(1, len(curve) // 10)
    first, last = sum(curve[:window]) / window, sum(curve[-window:]) / window
    spent = total.rollout_s + total.train_s + total.sync_s
    print(f"mean reward: first {window} steps {first:.3f} -> last {window} steps {last:.3f}")
    print(
        f"time: rollout {total.rollout_s:.1f} s ({total.rollout_s / spent:.0%}), train {total.train_s:.1f} s "
        f"({total.train_s / spent:.0%}), weight sync {total.sync_s:.2f} s ({total.sync_s / spent:.0%}; "
        f"{total.sync_s / len(curve) * 1000:.1f} ms per step)"
    )
    rollouts = len(curve) * args.prompts_per_step * args.group_size
    print(f"rollouts: {rollouts} ({total.rollout_tokens} tokens) at {total.rollout_tokens / total.rollout_s:.0f} tok/s")
    print(f"largest |Hawker logprob - trainer logprob|: {worst_mismatch:.2e}")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(range(len(curve)), curve)
    axis.set_xlabel("GRPO step")
    axis.set_ylabel("mean reward")
    axis.set_title("examples/grpo.py: Hawker rollouts, torch trainer")
    axis.set_ylim(0, 1)
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=120)
    print(f"reward curve: {args.plot}")


if __name__ == "__main__":
    main()
