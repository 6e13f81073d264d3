"""Tokenizers and chat templates through transformers (offline, local files only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def load_tokenizer(model_path: Path) -> PreTrainedTokenizerBase:
    """Tokenizer of a HF directory, or the one embedded in a GGUF file's metadata.

    A GGUF's tokenizer is built by the fast tokenizer class itself: through
    ``AutoTokenizer`` transformers first reads the file's whole config with
    ``gguf.GGUFReader`` to pick a class (4 s for the default model, against
    0.3 s for the tokenizer); for a GGUF it picks this one anyway
    (tests/loader/test_default_gguf.py compares the two).
    """
    if model_path.suffix == ".gguf":
        return PreTrainedTokenizerFast.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, local_files_only=True
        )
    return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError("this model has no chat template; pass chat_template=... or use generate()")
    text = tokenizer.apply_chat_template(
        messages,
        tools=tools,  # type: ignore[arg-type]  # a list of dicts is what it takes
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
    )
    assert isinstance(text, str), "tokenize=False renders text"
    return text
