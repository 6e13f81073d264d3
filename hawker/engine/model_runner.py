"""Turns a SchedulerOutput into flat tensors, runs the model, samples.

The runner owns the model weights and the KV cache storage; it makes no
scheduling decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hawker.attention.backend import StepAttention, build_backend
from hawker.config import EngineConfig
from hawker.distributed.pipeline import StageLinks, split_micro_batches
from hawker.engine.compiled_decode import CompiledDecode, Forward, rows_within_graph_budget, warm_up_row_counts
from hawker.engine.request import PENDING_TOKEN
from hawker.engine.runner import LogitsObserver, WeightSource
from hawker.engine.sampler import (
    JoinedSample,
    PendingSample,
    Sampler,
    SampleRow,
    logprob_entries,
    logprob_tensors,
    trim_top,
)
from hawker.engine.step_kinds import forward_groups, is_decode
from hawker.engine.weight_updates import check_updatable, check_weights, write_weights
from hawker.host_transfer import HostCopy, upload
from hawker.huge_pages import zero_on_huge_pages, zeros_on_huge_pages
from hawker.layers.projection import ProjectionCopies, consistent_prefill_rows
from hawker.loader.checkpoint import open_checkpoint
from hawker.models.base import CausalLM
from hawker.outputs import PositionLogprobs
from hawker.step import ModelOutput, ScheduledSeq, SchedulerOutput, SeqResult, StepHandle
from hawker.structured.masks import StepMasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _PromptLogprobs:
    """One sequence's prompt logprobs of this step, gathered on the device."""

    request_id: str
    targets: tuple[int, ...]
    top_k: int
    copy: HostCopy  # of logprob_tensors' five

    def entries(self) -> list[PositionLogprobs]:
        found = logprob_entries(*self.copy.wait())
        return [trim_top(e, t, self.top_k) for e, t in zip(found, self.targets, strict=True)]


class LaunchedStep:
    """A step queued on the device. Its sampled tokens stay there (``token_ids``,
    row ``token_rows[request_id]``) for the next step to read; ``result()``
    waits for this step only and reads them back with their logprobs."""

    def __init__(
        self,
        request_ids: list[str],
        sampled_ids: list[str],
        sample: PendingSample | JoinedSample | None,
        prompt_logprobs: list[_PromptLogprobs],
    ) -> None:
        self.request_ids = request_ids
        self.token_rows = {request_id: row for row, request_id in enumerate(sampled_ids)}
        self.token_ids = sample.token_ids if sample is not None else None
        self._sample = sample
        self._prompt_logprobs = prompt_logprobs

    def result(self) -> ModelOutput:
        prompt = {p.request_id: p.entries() for p in self._prompt_logprobs}
        results: dict[str, SeqResult] = {}
        if self._sample is not None:
            sampled = self._sample.result()
            for request_id, row in self.token_rows.items():
                token, logprobs = sampled.token_ids[row], sampled.logprobs[row]
                results[request_id] = SeqResult(token, logprobs, prompt.get(request_id))
        for request_id in self.request_ids:
            if request_id not in results:
                results[request_id] = SeqResult(None, None, prompt.get(request_id))
        return ModelOutput(results=results)


@dataclass(frozen=True)
class _Batch:
    order: list[ScheduledSeq]  # decodes first, then prefill chunks
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: StepAttention  # the attention backend's, shared by every layer
    row_ends: list[int]  # exclusive end row of each seq in `order`


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: CausalLM,
        num_blocks: int,
        eos_token_id: int | None,
        stage: StageLinks | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.block_size = config.cache.block_size
        # This rank's KV heads: replicated ones count once per rank.
        self.kv_heads = max(1, config.model.num_kv_heads // config.parallel.tensor_parallel_size)
        self.stage = stage  # None without pipeline parallelism
        self.attention = build_backend(config, self.kv_heads)
        self.kv_caches = self._allocate_kv_cache(num_blocks)
        self.sampler = Sampler(eos_token_id, seed=config.seed, device=self.device, row_by_row=config.batch_invariant)
        self.logits_observer: LogitsObserver | None = None
        self.compiled_decode = self._compile_decode(config.compile_decode_max_rows)
        self.decode_graphs = self._capture_decode_graphs(config.cuda_graph_max_batch_size)

    def _compile_decode(self, max_rows: int) -> CompiledDecode | None:
        if not max_rows:
            return None
        projections = [m for m in self.model.modules() if isinstance(m, ProjectionCopies)]
        branches = {rows for m in projections for rows in m.graph_rows(max_rows)}
        bounded = rows_within_graph_budget(max_rows, branches)
        if bounded < max_rows:
            logger.info(
                "compiling decode steps of up to %d rows, not %d: the matmul plan branches too often", bounded, max_rows
            )
            max_rows = bounded  # warm_up_row_counts leaves out the branches beyond it
        compiled = CompiledDecode(
            self.model, max_rows, self.config.native_decode_attention, self.config.compile_cpp_wrapper
        )
        background = self.config.compile_warmup == "background"
        compiled.warm_up(self.kv_caches, warm_up_row_counts(max_rows, branches), background)
        return compiled

    def _capture_decode_graphs(self, max_rows: int, capture: str = "cuda") -> Any:
        if not max_rows:
            return None
        graphs = self.decode_graphs_for(max_rows, capture)
        graphs.capture_all()
        return graphs

    def decode_graphs_for(self, max_rows: int, capture: str) -> Any:
        """DecodeGraphs over this runner's model and cache (``capture="eager"`` lets tests run them on CPU)."""
        from hawker.engine.decode_graphs import DecodeGraphs  # needs triton, which a CPU install may lack

        block_size = self.block_size
        return DecodeGraphs(
            self.model,
            self.kv_caches,
            max_rows=max_rows,
            max_blocks_per_seq=-(-self.config.scheduler.max_model_len // block_size),
            block_size=block_size,
            kv_heads=self.kv_heads,
            capture=capture,
        )

    @property
    def warming_up(self) -> bool:
        return self.compiled_decode is not None and self.compiled_decode.warming_up

    def check_health(self) -> None:
        """Nothing outside this process to check."""

    def shutdown(self) -> None:
        """Nothing started outside this process."""

    def update_weights(self, weights: WeightSource) -> int:
        return write_weights(self.model, weights)

    def check_weights(self, weights: list[tuple[str, torch.Tensor]] | str) -> None:
        check_weights(self.model, weights)

    def release_memory(self, weights: bool) -> None:
        """Free the KV cache's memory (and the weights' with ``weights``), keeping every tensor object.

        Compiled graphs hold these tensors, so they are emptied in place
        (their storage resized to nothing) rather than replaced. Weights that
        could not be rebuilt from the checkpoint (quantised copies) refuse.
        """
        if weights:
            check_updatable(self.model, list(self.model.parameters()))
        for tensor in self._sleeping_tensors(weights):
            tensor.untyped_storage().resize_(0)
        if weights:
            for module in self._projections():
                module.release_copies()
        self.decode_graphs = None  # they read the old device addresses

    def restore_memory(self, checkpoint_path: str | None) -> None:
        """Undo ``release_memory``: zeroed KV cache; weights reloaded from ``checkpoint_path`` if released."""
        weights = checkpoint_path is not None
        for tensor in self._sleeping_tensors(weights):
            tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())
        for k_cache, v_cache in self.kv_caches:
            zero_on_huge_pages(k_cache)
            zero_on_huge_pages(v_cache)
        if checkpoint_path is not None:
            self.model.load_weights(open_checkpoint(checkpoint_path).weights())
            for module in self._projections():
                module.rebuild_copies()
        self.decode_graphs = self._capture_decode_graphs(self.config.cuda_graph_max_batch_size)

    def _sleeping_tensors(self, weights: bool) -> list[torch.Tensor]:
        tensors = [t for pair in self.kv_caches for t in pair]
        if weights:
            # Tied parameters share one storage: count it once.
            tensors += list({id(p): p.data for p in self.model.parameters()}.values())
        return tensors

    def _projections(self) -> list[ProjectionCopies]:
        return [m for m in self.model.modules() if isinstance(m, ProjectionCopies)]

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.config.model
        shape = (num_blocks, self.block_size, self.kv_heads, cfg.head_dim)
        dtype = self.config.cache.torch_dtype(cfg)
        return [
            (zeros_on_huge_pages(shape, dtype, self.device), zeros_on_huge_pages(shape, dtype, self.device))
            for _ in range(self.model.num_local_layers)
        ]

    # -------------------------------------------------------------- execute
    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> ModelOutput | None:
        """Run one step; returns the sampled tokens (None on a pipeline stage that does not sample)."""
        if self.stage is not None:
            return self._execute_stage(step, self.stage)
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: SchedulerOutput, previous: StepHandle | None = None) -> LaunchedStep:
        """Queue one step on the device without waiting for it (on a CPU it runs here).

        Tokens of ``step`` that are PENDING_TOKEN were sampled by ``previous``
        (the step still in flight) and are read from its device tensor.
        """
        assert self.stage is None, "pipeline stages run through execute()"
        graphs = self.decode_graphs
        if graphs is not None and graphs.handles(len(step.seqs)) and all(map(is_decode, step.seqs)):
            rows = list(range(1, len(step.seqs) + 1))
            hidden = graphs.run(step.seqs, lambda ids: self._fill_pending(ids, step.seqs, rows, previous))
            return self._launch_sample(step.seqs, rows, hidden, step.token_masks)
        order: list[ScheduledSeq] = []
        row_ends: list[int] = []
        hiddens: list[torch.Tensor] = []
        for seqs in forward_groups(step.seqs, apart=self.config.consistent_numerics):
            batch = self._prepare(self._twice_if_alone(seqs))
            self._fill_pending(batch.input_ids, batch.order, batch.row_ends, previous)
            forward: Forward = self.model
            if self.compiled_decode is not None and self.compiled_decode.handles(batch.input_ids, batch.meta):
                forward = self.compiled_decode
            hidden = forward(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
            offset = row_ends[-1] if row_ends else 0
            order += batch.order[: len(seqs)]
            row_ends += [offset + end for end in batch.row_ends[: len(seqs)]]
            hiddens.append(hidden[: row_ends[-1] - offset])  # without padding rows
        hidden = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens)
        return self._launch_sample(order, row_ends, hidden, step.token_masks)

    def _twice_if_alone(self, seqs: Sequence[ScheduledSeq]) -> Sequence[ScheduledSeq]:
        """Consistent numerics: a lone decode runs as two identical rows (the copy writes the same cache
        slot with the same values and is dropped), because the compiled graph for one row is another
        program than the one for 2..max rows and rounds differently."""
        alone = len(seqs) == 1 and is_decode(seqs[0])
        if self.config.consistent_numerics and self.compiled_decode is not None and alone:
            return [seqs[0], seqs[0]]
        return seqs

    def _fill_pending(
        self,
        input_ids: torch.Tensor,
        order: Sequence[ScheduledSeq],
        row_ends: Sequence[int],
        previous: StepHandle | None,
    ) -> None:
        """Copy pending tokens into ``input_ids`` on the device.

        Only a sequence's last token can be pending (sampled by ``previous``):
        the scheduler never re-admits a request whose tokens are not all known.
        """
        ends = zip(order, row_ends, strict=True)
        pending = [(seq, end - 1) for seq, end in ends if seq.token_ids[-1] == PENDING_TOKEN]
        if not pending:
            return
        if not isinstance(previous, LaunchedStep) or previous.token_ids is None:
            raise RuntimeError("a step reads pending tokens but the step that samples them is not given")
        sources = [previous.token_rows[seq.request_id] for seq, _ in pending]
        rows = upload([row for _, row in pending], torch.long, self.device)
        input_ids[rows] = previous.token_ids[upload(sources, torch.long, self.device)]

    def _execute_stage(self, step: SchedulerOutput, stage: StageLinks) -> ModelOutput | None:
        """This pipeline stage's part of a step, one micro-batch after another."""
        results: dict[str, SeqResult] = {}
        in_flight = []  # sends and the tensors they read, kept alive until done
        for seqs in split_micro_batches(step.seqs, stage.micro_batches):
            batch = self._prepare(seqs)
            received = None
            if stage.previous_rank is not None:
                shape = (batch.input_ids.shape[0], self.config.model.hidden_size)
                received = torch.empty(shape, dtype=self.config.model.dtype, device=self.device)
                dist.recv(received, src=stage.previous_rank)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, received)
            if stage.next_rank is not None:
                hidden = hidden.contiguous()
                send = dist.isend(hidden, dst=stage.next_rank)
                assert send is not None, "this rank is in the group"
                in_flight.append((send, hidden))
            else:
                sample = self._launch_sample(batch.order, batch.row_ends, hidden, step.token_masks)
                results.update(sample.result().results)
        for work, _ in in_flight:
            work.wait()
        return ModelOutput(results=results) if stage.next_rank is None else None

    def _prepare(self, seqs: Sequence[ScheduledSeq]) -> _Batch:
        decodes = [s for s in seqs if is_decode(s)]
        prefills = [s for s in seqs if not is_decode(s)]
        # Longest context first, so that decode groups of similar length are contiguous rows.
        decodes.sort(key=lambda s: -s.start_pos)
        order = decodes + prefills
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_ends: list[int] = []
        for seq in order:
            span = range(seq.start_pos, seq.start_pos + seq.num_tokens)
            ids.extend(seq.token_ids)
            positions.extend(span)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in span)
            row_ends.append(len(ids))
        if self.config.consistent_numerics and prefills:
            # A prefill forward never has the few rows that would take the
            # decode-sized matmul plans (hawker/layers/matmul_plan.py).
            # Padding rows (token 0 at position 0) write no cache slot.
            padding = consistent_prefill_rows(len(ids)) - len(ids)
            ids.extend([0] * padding)
            positions.extend([0] * padding)
        slot_mapping = upload(slots, torch.long, self.device)
        meta = self.attention.build(order, len(decodes), row_ends, slot_mapping)
        return _Batch(
            order=order,
            input_ids=upload(ids, torch.long, self.device),
            positions=upload(positions, torch.long, self.device),
            meta=meta,
            row_ends=row_ends,
        )

    def _launch_sample(
        self,
        order: Sequence[ScheduledSeq],
        row_ends: Sequence[int],
        hidden: torch.Tensor,
        masks: StepMasks | None,
    ) -> LaunchedStep:
        """Queue sampling of the sequences of ``order`` whose last row (exclusive ``row_ends``) is in ``hidden``."""
        sampled = [(seq, end - 1) for seq, end in zip(order, row_ends, strict=True) if seq.sample]
        prompt_logprobs = self._launch_prompt_logprobs(order, row_ends, hidden)
        pending = None
        if sampled:
            rows = upload([row for _, row in sampled], torch.long, self.device)
            logits = self.model.compute_logits(hidden[rows])
            if self.logits_observer is not None or masks is not None:
                logits = logits.float()  # else the sampler widens them only where a row needs more than argmax
            if self.logits_observer is not None:
                self.logits_observer([seq.request_id for seq, _ in sampled], logits)
            if masks is not None:  # structured outputs: only the tokens their constraints allow
                masks.apply(logits, [seq.request_id for seq, _ in sampled])
            sample_rows = [
                SampleRow(s.sampling_params, s.sample_index, s.output_index, s.history, s.num_prompt_tokens)
                for s, _ in sampled
            ]
            pending = self.sampler.launch(logits, sample_rows)
        request_ids = [seq.request_id for seq in order]
        return LaunchedStep(request_ids, [seq.request_id for seq, _ in sampled], pending, prompt_logprobs)

    def _launch_prompt_logprobs(
        self, order: Sequence[ScheduledSeq], row_ends: Sequence[int], hidden: torch.Tensor
    ) -> list[_PromptLogprobs]:
        found: list[_PromptLogprobs] = []
        for seq, end in zip(order, row_ends, strict=True):
            targets = seq.prompt_logprob_targets
            if not targets:
                continue
            first = end - seq.num_tokens
            logits = self.model.compute_logits(hidden[first : first + len(targets)]).float()
            chosen = upload(targets, torch.long, self.device)
            k = seq.sampling_params.prompt_logprobs or 0
            tensors = logprob_tensors(torch.log_softmax(logits, dim=-1), chosen, k)
            found.append(_PromptLogprobs(seq.request_id, targets, k, HostCopy(tensors)))
        return found
