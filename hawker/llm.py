"""Offline API with vLLM's shape: ``LLM(...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hawker.engine.engine import Engine
from hawker.loader.chat_templates import tools_template
from hawker.loader.tokenizer import render_chat
from hawker.options import EngineOptions
from hawker.outputs import RequestOutput
from hawker.sampling_params import SamplingParams

# Offline runs submit whole batches at once: like vLLM's LLM class (256 on a CPU and most GPUs, against 128
# for its CPU server, vllm/engine/arg_utils.py), more sequences decode together than the server's default.
OFFLINE_MAX_NUM_SEQS = 256

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Loads a model once and runs batches of prompts through the engine.

    ``model`` is a HF directory or a .gguf file; None means the default
    SmolLM2-135M-Instruct GGUF. Keyword options are those of ``EngineOptions``
    (dtype, max_model_len, block_size, kv_cache_memory_gb, num_kv_blocks,
    enable_prefix_caching, max_num_batched_tokens, max_num_seqs, seed, device,
    tensor_parallel_size, pipeline_parallel_size, ...). With more than one
    rank, call ``close()`` (or use ``with LLM(...) as llm``) to stop the
    worker processes; they also exit when this process does. ``max_num_seqs``
    defaults to ``OFFLINE_MAX_NUM_SEQS`` here (the server's default is 128).
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        known = set(EngineOptions.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown LLM option(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        options.setdefault("max_num_seqs", OFFLINE_MAX_NUM_SEQS)
        self.engine = Engine.from_options(EngineOptions(model=model, **options))
        self._ids = itertools.count()

    def update_weights(self, weights: Iterable[tuple[str, Any]] | str | Path) -> int:
        """Take new weights in place: (HF name, tensor) pairs such as ``trainer.state_dict().items()``
        (only changed tensors are needed) or a directory of safetensors; returns the new weight version."""
        return self.engine.update_weights(weights)

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def pause_generation(self, mode: str = "abort") -> list[RequestOutput]:
        """Stop generating; ``mode="abort"`` ends the requests in flight, ``"keep"`` keeps them for later."""
        return self.engine.pause_generation(mode)

    def resume_generation(self) -> None:
        self.engine.resume_generation()

    def sleep(self, level: int = 1) -> None:
        """Release the KV cache (level 1) and the weights too (level 2) until ``wake_up()``."""
        self.engine.sleep(level)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        """Stop the worker processes of a tensor / pipeline parallel engine (a no-op in one process)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        batch = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(batch))
        request_ids: list[str] = []
        try:
            for prompt, p in zip(batch, params, strict=True):
                request_ids.append(self._add(prompt, p))
        except ValueError:
            for request_id in request_ids:  # a bad prompt leaves nothing queued
                self.engine.abort(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one or more conversations and generate.

        ``tools`` (OpenAI's shape) are shown by the template; a ChatML model whose own template ignores them
        gets Hawker's tool template (hawker/loader/chat_templates.py). The calls stay in the text, in the
        Hermes ``<tool_call>`` format; ``hawker.server.message_parsing.parse_message`` reads them out.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if tools:
            chat_template = tools_template(self.engine.tokenizer, chat_template)
            if chat_template is None:
                raise ValueError("this model's chat template cannot show tools; pass chat_template=...")
        prompts: list[Prompt] = []
        for conversation in conversations:
            text = render_chat(self.engine.tokenizer, conversation, add_generation_prompt, chat_template, tools)  # type: ignore[arg-type]
            ids = self.engine.tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        text, ids = self._tokenize(prompt)
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, ids, params, prompt=text)
        return request_id

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        return tokenize_prompt(self.engine.tokenizer, prompt)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        if self.engine.paused:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise ValueError("generation is paused: call resume_generation() (or wake_up()) first")
        wanted = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm or len(request_ids) < 2)
        with bar:
            while len(finished) < len(wanted) and self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in request_ids]


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> tuple[str | None, list[int]]:
    """(text, token ids) of a prompt: text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...}."""
    if isinstance(prompt, str):
        return prompt, list(tokenizer(prompt).input_ids)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return tokenize_prompt(tokenizer, prompt["prompt"])
        raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    return None, list(prompt)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # a single prompt of token ids
    return items


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    items = list(params)
    if len(items) != count:
        raise ValueError(f"got {len(items)} sampling params for {count} prompts")
    return items
