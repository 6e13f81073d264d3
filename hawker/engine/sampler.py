"""Batched logits processing and sampling.

All requests of a step are processed together in tensor operations. The
only per-row Python work is drawing the random number of seeded rows, so that
a seeded request's samples depend only on its seed and its own position,
never on the rest of the batch (nor on preemption).

Sampling inverts the cumulative distribution: one uniform number a row,
found in the row's running sum of probabilities. It replaced the
exponential race (argmax(p / E), E ~ Exp(1)), which needs a random number
for every vocabulary entry: on a CPU torch's generator draws them one after
another, 36 ms for 24 rows of a 49,152-token vocabulary against 1 ms for
the running sums (benchmarks/NOTES.md). On a CPU the random rows are drawn by
a C kernel (hawker/kernels/sampling.py) that finds top-k / top-p sets
without sorting; rows wanting logprobs keep the torch code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hawker.host_transfer import HostCopy, upload
from hawker.kernels import rowwise, sampling
from hawker.outputs import Logprob, PositionLogprobs
from hawker.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    sample_index: int
    output_index: int
    history: tuple[int, ...]  # all tokens so far (only when penalties are on)
    num_prompt_tokens: int


@dataclass(frozen=True)
class SamplerResult:
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]


@dataclass(frozen=True)
class _LogprobGroup:
    """Rows whose logprobs come from one distribution (raw or processed), gathered on the device."""

    rows: tuple[int, ...]
    top_ks: tuple[int, ...]
    tensors: tuple[torch.Tensor, ...]  # logprob_tensors' five


class PendingSample:
    """Sampled token ids on the device (``token_ids``), read back with their logprobs by ``result()``."""

    def __init__(self, token_ids: torch.Tensor, groups: tuple[_LogprobGroup, ...]) -> None:
        self.token_ids = token_ids
        self._groups = groups
        self._copy = HostCopy([token_ids, *(t for g in groups for t in g.tensors)])

    def result(self) -> SamplerResult:
        host = self._copy.wait()
        token_ids: list[int] = host[0].tolist()
        logprobs: list[PositionLogprobs | None] = [None] * len(token_ids)
        offset = 1
        for group in self._groups:
            entries = logprob_entries(*host[offset : offset + len(group.tensors)])
            offset += len(group.tensors)
            for row, k, entry in zip(group.rows, group.top_ks, entries, strict=True):
                logprobs[row] = trim_top(entry, token_ids[row], k)
        return SamplerResult(token_ids=token_ids, logprobs=logprobs)


class JoinedSample:
    """Pending samples of consecutive rows read back as one (row-by-row sampling)."""

    def __init__(self, parts: list[PendingSample]) -> None:
        self.token_ids = torch.cat([p.token_ids for p in parts])
        self._parts = parts

    def result(self) -> SamplerResult:
        results = [p.result() for p in self._parts]
        return SamplerResult([t for r in results for t in r.token_ids], [lp for r in results for lp in r.logprobs])


def seeded_generator(seed: int, sample_index: int, output_index: int, device: torch.device) -> torch.Generator:
    """A generator whose state depends only on (seed, sample, position)."""
    mixed = hash((seed, sample_index, output_index)) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator(device=device).manual_seed(mixed)


class Sampler:
    def __init__(
        self, eos_token_id: int | None, seed: int = 0, device: torch.device | None = None, row_by_row: bool = False
    ) -> None:
        """``row_by_row``: sample each row alone (batch-invariant mode: results cannot depend on the others)."""
        self.eos_token_id = eos_token_id
        self.device = device or torch.device("cpu")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.row_by_row = row_by_row

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> SamplerResult:
        return self.launch(logits, rows).result()

    def launch(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> PendingSample | JoinedSample:
        """Queue the sampling of every row on the device; the result is read back by ``result()``."""
        if not self.row_by_row or len(rows) == 1:
            return self._launch_rows(logits, rows)
        return JoinedSample([self._launch_rows(logits[i : i + 1].clone(), [row]) for i, row in enumerate(rows)])

    def _launch_rows(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> PendingSample:
        if all(self._argmax_only(row) for row in rows):
            return PendingSample(greedy_tokens(logits), ())
        if sampling.serves(logits) and all(self._kernel_logprobs(row) for row in rows):
            pending = self._sample_in_kernel(logits, rows)
            if pending is not None:
                return pending
        logits = logits.float()
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw = any(rows[i].params.logprobs_mode == "raw" for i in wanted)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if raw else None
        logits = self._apply_penalties(logits, rows)
        logits = _apply_logit_bias(logits, rows)
        logits = self._apply_min_tokens(logits, rows)
        processed = any(rows[i].params.logprobs_mode == "processed" for i in wanted)
        token_ids, sampled_logprobs = self._sample(logits, rows, processed)
        groups: list[_LogprobGroup] = []
        for source, mode in ((raw_logprobs, "raw"), (sampled_logprobs, "processed")):
            group = [i for i in wanted if rows[i].params.logprobs_mode == mode]
            if not group or source is None:
                continue
            index = upload(group, torch.long, logits.device)
            top = max(rows[i].params.logprobs or 0 for i in group)
            tensors = logprob_tensors(source[index], token_ids[index], top)
            groups.append(_LogprobGroup(tuple(group), tuple(rows[i].params.logprobs or 0 for i in group), tensors))
        return PendingSample(token_ids, tuple(groups))

    def _argmax_only(self, row: SampleRow) -> bool:
        """Greedy with nothing that changes or reports the logits: its token is the first largest logit."""
        params = row.params
        return (
            params.greedy
            and params.logprobs is None
            and not params.uses_penalties
            and not params.logit_bias
            and not self._min_tokens_block(row)
        )

    # ------------------------------------------------------------ processors
    def _apply_penalties(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        penalized = [i for i, r in enumerate(rows) if r.params.uses_penalties]
        if not penalized:
            return logits
        vocab = logits.shape[-1]
        device = logits.device
        penalized_rows = upload(penalized, torch.long, device)
        sub = logits[penalized_rows]
        width = max(len(rows[i].history) for i in penalized)
        # Padded with the id `vocab`; output tokens are the columns num_prompt_tokens .. len(history).
        padded = [[*rows[i].history, *[vocab] * (width - len(rows[i].history))] for i in penalized]
        history = upload(padded, torch.long, device)
        columns = torch.arange(width, device=device).unsqueeze(0)
        output_starts = upload([rows[i].num_prompt_tokens for i in penalized], torch.long, device).unsqueeze(1)
        is_output = (columns >= output_starts) & (history < vocab)
        # One extra column absorbs the padding id `vocab`.
        seen = torch.zeros((len(penalized), vocab + 1), device=device)
        seen.scatter_(1, history, 1.0)
        out_counts = torch.zeros((len(penalized), vocab + 1), device=device)
        out_counts.scatter_add_(1, history, is_output.float())
        seen, out_counts = seen[:, :vocab] > 0, out_counts[:, :vocab]

        def column(values: list[float]) -> torch.Tensor:
            return upload(values, torch.float32, device).unsqueeze(1)

        rep = column([rows[i].params.repetition_penalty for i in penalized])
        rep_applied = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, rep_applied, sub)
        sub = sub - column([rows[i].params.frequency_penalty for i in penalized]) * out_counts
        sub = sub - column([rows[i].params.presence_penalty for i in penalized]) * (out_counts > 0).float()
        logits = logits.clone()
        logits[penalized_rows] = sub
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        blocked = [(i, self._stop_ids(r.params)) for i, r in enumerate(rows) if r.output_index < r.params.min_tokens]
        blocked = [(i, ids) for i, ids in blocked if ids]
        if not blocked:
            return logits
        pairs = [(i, token) for i, ids in blocked for token in ids]  # rare: only rows still under min_tokens
        row_index = upload([i for i, _ in pairs], torch.long, logits.device)
        token_index = upload([t for _, t in pairs], torch.long, logits.device)
        logits = logits.clone()
        logits[row_index, token_index] = _NEG_INF
        return logits

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            ids.add(self.eos_token_id)
        return ids

    # -------------------------------------------------------------- sampling
    def _sample(
        self, logits: torch.Tensor, rows: Sequence[SampleRow], want_logprobs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampled token ids, and (if wanted) every row's log-probabilities under the distribution it sampled from."""
        # max's indices, not argmax: the same first maximal index, in 0.6 against 1.5 ms for 48 rows of the
        # default model's 49,152 logits on a CPU (torch 2.13).
        greedy_tokens = logits.max(dim=-1).indices
        # Greedy rows: the processed logits' log-softmax (temperature 0 has no distribution of its own).
        sampled_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not random_rows:
            return greedy_tokens, sampled_logprobs
        random_index = upload(random_rows, torch.long, logits.device)
        sub = logits[random_index]
        params = [rows[i].params for i in random_rows]
        sub = sub / upload([p.temperature for p in params], torch.float32, sub.device).unsqueeze(1)
        sub = _top_k_top_p(sub, [p.top_k for p in params], [p.top_p for p in params])
        probs = torch.softmax(sub, dim=-1)
        probs = _min_p(probs, [p.min_p for p in params])
        uniforms = self._uniforms([rows[i] for i in random_rows])
        greedy_tokens[random_index] = _inverse_cdf_draw(probs, uniforms)
        if sampled_logprobs is not None:
            # min_p zeroed some probabilities without renormalising: renormalise here.
            sampled_logprobs[random_index] = torch.log(probs / probs.sum(dim=-1, keepdim=True))
        return greedy_tokens, sampled_logprobs

    def _kernel_logprobs(self, row: SampleRow) -> bool:
        """Whether the kernel gives what the row asks of logprobs: none, processed ones, or raw ones of logits
        it receives as the model gave them (no logit bias or min_tokens processed before)."""
        params = row.params
        return params.logprobs is None or params.logprobs_mode == "processed" or not self._changes_before_kernel(row)

    def _sample_in_kernel(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> PendingSample | None:
        """Every row's token with the random rows drawn by the C kernel (hawker/kernels/sampling.py), in place
        of _sample's sorts and float64 passes over the vocabulary, with their processed logprobs where asked
        for (greedy rows that want them or have penalties go to the kernel too); None where the kernel declines
        (a NaN). Penalties are applied in the kernel; a logit bias or min_tokens has the torch code process the
        logits first (in its order: penalties, bias, min_tokens)."""
        # The kernel's rows: sampled ones, and greedy ones whose penalties or logprobs it computes.
        kernel_rows = [
            i
            for i, r in enumerate(rows)
            if not r.params.greedy or r.params.uses_penalties or r.params.logprobs is not None
        ]
        in_torch = any(self._changes_before_kernel(r) for r in rows)
        if in_torch and any(r.params.logprobs is not None and r.params.logprobs_mode == "raw" for r in rows):
            return None  # raw logprobs need the logits before the bias: the torch code
        if in_torch:
            logits = self._apply_min_tokens(_apply_logit_bias(self._apply_penalties(logits.float(), rows), rows), rows)
        params = [rows[i].params for i in kernel_rows]
        penalties = None
        if not in_torch and any(p.uses_penalties for p in params):
            penalties = sampling.Penalties(
                [rows[i].history for i in kernel_rows],
                [rows[i].num_prompt_tokens for i in kernel_rows],
                [p.repetition_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.presence_penalty for p in params],
            )
        wanted = [j for j, p in enumerate(params) if p.logprobs is not None]
        kernel_index = None if len(kernel_rows) == len(rows) else upload(kernel_rows, torch.long, logits.device)
        drawn = sampling.sample(
            logits if kernel_index is None else logits[kernel_index],
            [0.0 if p.greedy else p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
            self._kernel_uniforms([rows[i] for i in kernel_rows]),
            penalties,
            max((params[j].logprobs or 0 for j in wanted), default=0) if wanted else None,
            [p.logprobs_mode == "raw" for p in params],
        )
        if drawn is None:
            return None
        groups: tuple[_LogprobGroup, ...] = ()
        if drawn.logprobs is not None:
            index = upload(wanted, torch.long, logits.device)
            group_rows = tuple(kernel_rows[j] for j in wanted)
            group_tops = tuple(params[j].logprobs or 0 for j in wanted)
            groups = (_LogprobGroup(group_rows, group_tops, tuple(t[index] for t in drawn.logprobs)),)
        if kernel_index is None:
            return PendingSample(drawn.token_ids, groups)
        token_ids = greedy_tokens(logits)
        token_ids[kernel_index] = drawn.token_ids
        return PendingSample(token_ids, groups)

    def _kernel_uniforms(self, rows: Sequence[SampleRow]) -> torch.Tensor:
        """_uniforms of the sampled rows, 0 for greedy ones: the generator advances as the torch code's does."""
        sampled = [j for j, row in enumerate(rows) if not row.params.greedy]
        if len(sampled) == len(rows):
            return self._uniforms(rows)
        uniforms = torch.zeros((len(rows), 1), dtype=torch.float64, device=self.device)
        if sampled:
            uniforms[sampled] = self._uniforms([rows[j] for j in sampled])
        return uniforms

    def _changes_before_kernel(self, row: SampleRow) -> bool:
        """A logit bias or min_tokens: processed by the torch code before the kernel."""
        return bool(row.params.logit_bias) or self._min_tokens_block(row)

    def _min_tokens_block(self, row: SampleRow) -> bool:
        """Whether min_tokens still blocks the row's stop tokens."""
        return bool(row.output_index < row.params.min_tokens and self._stop_ids(row.params))

    def _uniforms(self, rows: Sequence[SampleRow]) -> torch.Tensor:
        """One number in [0, 1) a row, float64 [rows, 1]; a seeded row's from its own generator."""
        uniforms = torch.rand((len(rows), 1), generator=self.generator, dtype=torch.float64, device=self.device)
        for j, row in enumerate(rows):
            if row.params.seed is not None:
                gen = seeded_generator(row.params.seed, row.sample_index, row.output_index, self.device)
                uniforms[j] = torch.rand(1, generator=gen, dtype=torch.float64, device=self.device)
        return uniforms


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest logit, in the logits' own dtype: widening bfloat16 is exact, so the
    index is the float32 one's. Eager bfloat16 CPU rows take one C pass (hawker/kernels/rowwise.py): widening a
    step's 128 x 49,152 logits and torch's max took ~3 ms against ~0.4 (benchmarks/NOTES.md, session 17)."""
    if logits.dim() == 2 and rowwise.serves(logits):
        tokens = rowwise.argmax(logits)
        if tokens is not None:  # None: a NaN, which torch's max reports as it does
            return tokens
    return logits.max(dim=-1).indices


def _inverse_cdf_draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """A draw from each row of ``probs`` (unnormalised; zeros are never drawn) given one uniform number a row.

    The running sums are float64 so that the last tokens of a large
    vocabulary keep their own probabilities instead of the rounding error
    of the tokens before them.
    """
    cumulative = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cumulative[:, -1:]
    # Strictly below the total: the first running sum above the target then
    # always ends a token of nonzero probability (a zero adds no width).
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(1)


# Top-k / top-p first look among each row's this many most likely tokens:
# a full sort of a 49,152-token row costs about 2.3 ms on a CPU, the 256
# largest about 0.15 ms. Rows whose kept set does not end among them are
# sorted whole.
TOP_CANDIDATES = 256


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """``logits`` with every token outside each row's top-k and top-p set at -inf.

    The top-p set is the smallest prefix of the tokens by falling
    probability (after top-k) whose mass reaches top_p; the first token
    always stays.
    """
    vocab = logits.shape[-1]
    ks = [vocab if k == -1 else min(k, vocab) for k in top_ks]
    filtered = [i for i, (k, p) in enumerate(zip(ks, top_ps, strict=True)) if k < vocab or p < 1.0]
    if not filtered:
        return logits
    if len(filtered) < len(ks):
        out = logits.clone()
        index = upload(filtered, torch.long, logits.device)
        out[index] = _top_k_top_p(logits[index], [ks[i] for i in filtered], [top_ps[i] for i in filtered])
        return out
    # One more than the largest top-k, so that a row cut by top-k alone always ends among them.
    candidates = max(TOP_CANDIDATES, max((k + 1 for k in ks if k < vocab), default=0))
    if logits.device.type != "cpu" or candidates * 4 >= vocab:
        # On a GPU the sort is cheap and the check below would wait for the device.
        return _sorted_filter(logits, logits.sort(dim=-1, descending=True), ks, top_ps)
    top = logits.topk(candidates, dim=-1)
    # Probabilities over the whole row (after top-k, whose set lies among the candidates).
    full_row = torch.tensor([k == vocab for k in ks], device=logits.device).unsqueeze(1)
    # Only rows without top-k need the whole row's normaliser (a pass over the vocabulary).
    row_lse = torch.logsumexp(logits, dim=-1, keepdim=True) if vocab in ks else torch.zeros_like(logits[:, :1])
    kept = _kept(top.values, ks, top_ps, row_lse, full_row)
    # Candidates cover a row when its kept set ends before the last of them.
    covered = ~kept[:, -1]
    out = torch.full_like(logits, _NEG_INF).scatter_(1, top.indices, top.values.masked_fill(~kept, _NEG_INF))
    uncovered = (~covered).nonzero().flatten().tolist()
    if uncovered:
        index = upload(uncovered, torch.long, logits.device)
        rows = logits[index]
        out[index] = _sorted_filter(
            rows, rows.sort(dim=-1, descending=True), [ks[i] for i in uncovered], [top_ps[i] for i in uncovered]
        )
    return out


def _kept(
    values: torch.Tensor, ks: list[int], top_ps: list[float], row_lse: torch.Tensor, full_row: torch.Tensor
) -> torch.Tensor:
    """Which of ``values`` (each row's largest logits, falling) stay under top-k and top-p.

    A row's probabilities are taken against ``row_lse`` where ``full_row``
    (no top-k: every token counts), else against its top-k among ``values``.
    """
    ranks = torch.arange(values.shape[-1], device=values.device).unsqueeze(0)
    drop = ranks >= upload(ks, torch.long, values.device).unsqueeze(1)
    masked = values.masked_fill(drop, _NEG_INF)
    lse = torch.where(full_row, row_lse, torch.logsumexp(masked, dim=-1, keepdim=True))
    probs = (masked - lse).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    return ~(drop | (mass_before >= upload(top_ps, torch.float32, values.device).unsqueeze(1)))


def _sorted_filter(
    logits: torch.Tensor, ordered: torch.return_types.sort, ks: list[int], top_ps: list[float]
) -> torch.Tensor:
    """Top-k / top-p over whole sorted rows."""
    full_row = torch.zeros((logits.shape[0], 1), dtype=torch.bool, device=logits.device)
    kept = _kept(ordered.values, ks, top_ps, torch.zeros_like(full_row, dtype=logits.dtype), full_row)
    sorted_logits = ordered.values.masked_fill(~kept, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, ordered.indices, sorted_logits)


def _min_p(probs: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    if all(m <= 0.0 for m in min_ps):
        return probs
    threshold = upload(min_ps, torch.float32, probs.device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < threshold, 0.0)


def logprob_tensors(logprobs: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """Each row's chosen id, its logprob and rank (1 = best), and the top-``top`` ids and logprobs, on the device."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    chosen_rank = (logprobs > chosen_lp.unsqueeze(1)).sum(dim=1) + 1
    top_lp, top_ids = logprobs.topk(top, dim=-1) if top > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen, chosen_lp, chosen_rank, top_ids, top_lp


def logprob_entries(
    chosen: torch.Tensor,
    chosen_lp: torch.Tensor,
    chosen_rank: torch.Tensor,
    top_ids: torch.Tensor,
    top_lp: torch.Tensor,
) -> list[PositionLogprobs]:
    """Per row, the top entries plus the chosen token, from host copies of ``logprob_tensors``' five."""
    result: list[PositionLogprobs] = []
    rows = zip(
        chosen.tolist(), chosen_lp.tolist(), chosen_rank.tolist(), top_ids.tolist(), top_lp.tolist(), strict=True
    )
    for token, lp, rank, ids, lps in rows:
        entry = {tid: Logprob(logprob=v, rank=r + 1) for r, (tid, v) in enumerate(zip(ids, lps, strict=True))}
        entry[token] = Logprob(logprob=lp, rank=rank)
        result.append(entry)
    return result


def trim_top(entry: PositionLogprobs, chosen: int, k: int) -> PositionLogprobs:
    """Keep the chosen token and the best ``k`` others of a gathered entry."""
    return {tid: lp for tid, lp in entry.items() if tid == chosen or lp.rank <= k}


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Add every row's (token, bias) pairs in one scatter."""
    pairs = [(i, token, bias) for i, r in enumerate(rows) for token, bias in r.params.logit_bias]
    if not pairs:
        return logits
    row_index, token_index, bias = zip(*pairs, strict=True)
    device = logits.device
    logits = logits.clone()
    logits.index_put_(
        (upload(row_index, torch.long, device), upload(token_index, torch.long, device)),
        upload(bias, logits.dtype, device),
        accumulate=True,
    )
    return logits
