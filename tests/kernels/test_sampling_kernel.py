"""The C sampling kernel (hawker/kernels/sampling.py) against the definitions of top-k, top-p and min-p.

Each row is drawn at a grid of evenly spaced uniform numbers: the tokens drawn must be exactly the row's kept
set (every kept token above the grid's resolution shows up, no other ever does) at each token's probability
within the grid's resolution.
"""

from __future__ import annotations

import pytest
import torch

from hawker.engine.sampler import Sampler, SampleRow
from hawker.kernels import sampling
from hawker.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not sampling.serves(torch.zeros(1, 4)), reason="no C compiler for the kernel")

GRID = 2048


def _reference(row: torch.Tensor, temperature: float, k: int, p: float, min_p: float) -> dict[int, float]:
    """Kept token -> probability, token by token: the largest logits first, equal ones by token id."""
    values = row.double() / temperature
    order = sorted(range(len(row)), key=lambda i: (-float(values[i]), i))
    order = order[: len(order) if k == -1 else k]
    probs = torch.softmax(values[order], dim=0).tolist()
    kept: dict[int, float] = {}
    mass = 0.0
    for token, prob in zip(order, probs, strict=True):
        if kept and mass >= p:
            break
        kept[token] = prob
        mass += prob
    largest = max(kept.values())
    kept = {token: prob for token, prob in kept.items() if prob >= min_p * largest and prob > 0.0}
    total = sum(kept.values())
    return {token: prob / total for token, prob in kept.items()}


def _draw_grid(row: torch.Tensor, temperature: float, k: int, p: float, min_p: float) -> torch.Tensor:
    uniforms = ((torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID).unsqueeze(1)
    rows = row.unsqueeze(0).expand(GRID, -1)
    drawn = sampling.sample(rows, [temperature] * GRID, [k] * GRID, [p] * GRID, [min_p] * GRID, uniforms)
    assert drawn is not None
    return drawn.token_ids


def _rows() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab = 3000
    flat = torch.randn(vocab, generator=generator) * 0.5
    peaked = torch.randn(vocab, generator=generator) * 4
    # bfloat16 values: many exact ties, across which token order decides
    tied = (torch.randn(vocab, generator=generator) * 2).to(torch.bfloat16).float()
    masked = peaked.clone()
    masked[::3] = float("-inf")  # logit bias / min_tokens style exclusions
    negative = -torch.rand(vocab, generator=generator) * 30  # every logit negative, one -0.0
    negative[5] = -0.0
    return {"flat": flat, "peaked": peaked, "tied": tied, "masked": masked, "negative": negative}


SETTINGS = [
    (1.0, -1, 1.0, 0.0),
    (0.8, -1, 0.95, 0.0),
    (1.0, 50, 1.0, 0.0),
    (0.7, 40, 0.9, 0.0),
    (1.3, 1000, 0.8, 0.0),
    (1.0, -1, 1.0, 0.05),
    (0.5, 200, 0.99, 0.01),
    (1.0, 1, 1.0, 0.0),
    (2.0, -1, 0.3, 0.0),
]


@pytest.mark.parametrize("name", list(_rows()))
@pytest.mark.parametrize(("temperature", "k", "p", "min_p"), SETTINGS)
def test_draws_cover_exactly_the_kept_set_at_its_probabilities(
    name: str, temperature: float, k: int, p: float, min_p: float
) -> None:
    row = _rows()[name]
    expected = _reference(row, temperature, k, p, min_p)
    counts = torch.bincount(_draw_grid(row, temperature, k, p, min_p), minlength=len(row)).double() / GRID
    drawn = set(counts.nonzero().flatten().tolist())
    assert drawn <= set(expected), sorted(drawn - set(expected))[:10]
    assert {token for token, prob in expected.items() if prob > 2 / GRID} <= drawn
    for token, prob in expected.items():
        assert abs(float(counts[token]) - prob) <= 1.5 / GRID + 1e-6, (token, float(counts[token]), prob)


def test_bfloat16_rows_draw_as_their_float32_values() -> None:
    row = (torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    for k, p in [(-1, 1.0), (30, 0.9), (-1, 0.7)]:
        assert torch.equal(_draw_grid(row, 0.9, k, p, 0.0), _draw_grid(row.float(), 0.9, k, p, 0.0))


def test_a_row_draws_the_same_alone_and_in_a_batch() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(33, 4000, generator=generator) * 3
    uniforms = torch.rand(33, 1, generator=generator, dtype=torch.float64)
    settings = [
        (0.5 + (i % 4) * 0.3, [-1, 20, 500][i % 3], [1.0, 0.9, 0.6][i % 3], [0.0, 0.02][i % 2]) for i in range(33)
    ]
    temperatures, ks, ps, min_ps = (list(column) for column in zip(*settings, strict=True))
    batch = sampling.sample(logits, temperatures, ks, ps, min_ps, uniforms)
    assert batch is not None
    for i in range(33):
        alone = sampling.sample(logits[i : i + 1], temperatures[i : i + 1], ks[i : i + 1], ps[i : i + 1],
                                min_ps[i : i + 1], uniforms[i : i + 1])  # fmt: skip
        assert alone is not None and int(alone.token_ids[0]) == int(batch.token_ids[i])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_row_is_declined(bad: float) -> None:
    logits = torch.randn(3, 100)
    logits[1, 7] = bad
    uniforms = torch.full((3, 1), 0.5, dtype=torch.float64)
    assert sampling.sample(logits, [1.0] * 3, [-1] * 3, [1.0] * 3, [0.0] * 3, uniforms) is None


def test_the_sampler_draws_as_the_torch_code_did_and_the_switch_turns_the_kernel_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seeded rows through the kernel and through the torch code draw the same tokens (the same uniform
    numbers, the same inverse CDF; a draw within float rounding of a boundary may differ), and with the switch
    at 0 the kernel is not called."""
    row = torch.randn(4000, generator=torch.Generator().manual_seed(3)) * 0.5
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=300, seed=i) for i in range(256)]
    rows = [SampleRow(p, 0, 0, (), 0) for p in params]
    calls: list[int] = []
    kernel_sample = sampling.sample

    def counted(logits: torch.Tensor, *args: object) -> torch.Tensor | None:
        calls.append(logits.shape[0])
        return kernel_sample(logits, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sampling, "sample", counted)
    with_kernel = Sampler(eos_token_id=None)(row.repeat(256, 1), rows).token_ids
    assert calls == [256]
    monkeypatch.setenv(sampling.SWITCH_VARIABLE, "0")
    with_torch = Sampler(eos_token_id=None)(row.repeat(256, 1), rows).token_ids
    assert calls == [256]
    assert set(with_kernel) <= set(_reference(row, 0.8, 300, 0.9, 0.0))
    assert len(set(with_kernel)) > 50
    assert sum(a == b for a, b in zip(with_kernel, with_torch, strict=True)) >= 250


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalties_in_the_kernel_give_the_torch_codes_logits(dtype: torch.dtype) -> None:
    """Rows drawn with their penalties in the kernel and rows the torch code penalised first, drawn without:
    the same tokens at every uniform number (the same roundings), for histories with repeats, tokens only in
    the prompt and an empty one."""
    generator = torch.Generator().manual_seed(4)
    vocab, count = 500, 6
    logits = (torch.randn(count, vocab, generator=generator) * 2).to(dtype)
    histories = [
        tuple(torch.randint(0, 40, (length,), generator=generator).tolist()) for length in (30, 5, 0, 60, 12, 1)
    ]
    prompts = [10, 5, 0, 0, 12, 0]
    settings = [(1.3, 0.5, 0.2), (1.0, 1.5, -0.5), (2.0, 0.0, 0.0), (0.7, -0.3, 1.1), (1.1, 0.0, 0.9), (1.5, 2.0, 2.0)]
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=r, frequency_penalty=f, presence_penalty=p)
        for r, f, p in settings
    ]
    rows = [SampleRow(p, 0, 0, history, prompt) for p, history, prompt in zip(params, histories, prompts, strict=True)]
    penalised = Sampler(eos_token_id=None)._apply_penalties(logits.float(), rows)
    penalties = sampling.Penalties(histories, prompts, *([getattr(p, name) for p in params] for name in
                                   ("repetition_penalty", "frequency_penalty", "presence_penalty")))  # fmt: skip
    for u in torch.linspace(0.0005, 0.9995, 200).tolist():
        uniforms = torch.full((count, 1), u, dtype=torch.float64)
        plain = ([1.0] * count, [-1] * count, [0.9] * count, [0.0] * count, uniforms)
        in_kernel, torch_penalised = sampling.sample(logits, *plain, penalties), sampling.sample(penalised, *plain)
        assert in_kernel is not None and torch_penalised is not None
        assert torch.equal(in_kernel.token_ids, torch_penalised.token_ids)


def test_greedy_rows_among_sampled_ones_keep_their_argmax() -> None:
    """A mixed batch: greedy rows take the first largest logit (a penalised one the penalised logits'), the
    sampled rows draw what they draw alone."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 800, generator=generator) * 3
    greedy, penalised = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=2.0)
    sampled = SamplingParams(temperature=0.9, top_p=0.8, seed=9)
    top = int(logits[3].argmax())
    rows = [
        SampleRow(greedy, 0, 0, (), 0),
        SampleRow(sampled, 0, 0, (), 0),
        SampleRow(greedy, 0, 0, (), 0),
        SampleRow(penalised, 0, 0, (top,), 1),  # its largest logit halved (if positive): another token wins
        SampleRow(sampled, 1, 0, (), 0),
        SampleRow(sampled, 2, 0, (), 0),
    ]
    tokens = Sampler(eos_token_id=None)(logits, rows).token_ids
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert tokens[3] == int(Sampler(eos_token_id=None)._apply_penalties(logits[3:4], rows[3:4]).argmax()) != top
    for i in (1, 4, 5):
        assert tokens[i] == Sampler(eos_token_id=None)(logits[i : i + 1], rows[i : i + 1]).token_ids[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, logprobs=1),
        SamplingParams(temperature=0.8, top_p=0.9, logprobs=5),
        SamplingParams(temperature=0.7, top_k=3, logprobs=6),  # more logprobs than kept tokens: -inf ones
        SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.4, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=4),  # greedy rows' logprobs: temperature 1, nothing cut
        SamplingParams(temperature=0.0, frequency_penalty=1.5, logprobs=2),
        # raw: the model's own distribution, whatever the penalties and filters drew from
        SamplingParams(temperature=0.8, top_p=0.9, logprobs=3, logprobs_mode="raw"),
        SamplingParams(temperature=1.1, top_k=5, repetition_penalty=1.4, logprobs=7, logprobs_mode="raw"),
        SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=2, logprobs_mode="raw"),
    ],
)
def test_logprobs_from_the_kernel_are_the_torch_codes(params: SamplingParams, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded rows (with greedy rows between them) through the kernel and through the torch code: the same
    tokens, ranks and top ids, log-probabilities within float rounding (the order of entries the filters
    dropped, all -inf, is the torch code's topk's choice and not compared)."""
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(12, 3000, generator=generator) * 2
    greedy = SamplingParams(temperature=0.0)
    rows = [
        SampleRow(greedy if i % 4 == 3 else params.replace(seed=100 + i), 0, 0, tuple(range(i, 40 + i)), 20)
        for i in range(12)
    ]
    with_kernel = Sampler(eos_token_id=None)(logits, rows)
    monkeypatch.setenv(sampling.SWITCH_VARIABLE, "0")
    with_torch = Sampler(eos_token_id=None)(logits, rows)
    assert with_kernel.token_ids == with_torch.token_ids
    for i, (ours, theirs) in enumerate(zip(with_kernel.logprobs, with_torch.logprobs, strict=True)):
        if i % 4 == 3:
            assert ours is None and theirs is None
            continue
        assert ours is not None and theirs is not None
        # Tokens a filter dropped (-inf) have no order between them: only how many there are must agree.
        finite = [token for token, entry in ours.items() if entry.logprob > float("-inf")]
        assert finite == [token for token, entry in theirs.items() if entry.logprob > float("-inf")]
        assert len(ours) == len(theirs)
        for token in finite:
            assert ours[token].rank == theirs[token].rank
            assert ours[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-4)


def test_raw_logprobs_beside_a_logit_bias_are_of_the_unbiased_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another row's logit bias has the torch code process the batch's logits: a raw row is then left to the
    torch code, which takes its logprobs before any processing."""
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(7)) * 2
    raw = SamplingParams(temperature=1.0, repetition_penalty=1.5, logprobs=2, logprobs_mode="raw", seed=1)
    biased = SamplingParams(temperature=1.0, logit_bias=((3, 5.0),), seed=2)
    rows = [SampleRow(raw, 0, 0, tuple(range(50)), 10), SampleRow(biased, 0, 0, (), 0)]
    ours = Sampler(eos_token_id=None)(logits, rows)
    expected = torch.log_softmax(logits[0].double(), dim=0)
    entry = ours.logprobs[0]
    assert entry is not None
    for token, logprob in entry.items():
        assert logprob.logprob == pytest.approx(float(expected[token]), abs=1e-4)
