"""A real server for the structured-output and tool-calling tests (one for both modules: each start costs
seconds). It serves a tiny random-weight model: whatever the model prefers, a constraint decides the shape.
Hawker's ChatML tool template stands in for the model's own (``--chat-template``, which the tiny
tokenizer's template needs to show tools), and a constraint may take at most 0.5 s to compile (the
normal ones take milliseconds; the test's slow one seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import torch

from hawker.loader.chat_templates import CHATML_TOOLS
from tests.support.server_process import ServerProcess, launch, wait_ready
from tests.support.tiny_models import build_tiny_checkpoint

COMPILE_TIMEOUT_S = 0.5


@pytest.fixture(scope="session")
def structured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("structured-server")
    # The tiny tokenizer spends about a token per character: a prompt listing tools needs a longer context.
    torch.manual_seed(0)
    checkpoint = build_tiny_checkpoint("llama", folder / "llama", max_positions=2048)
    template = folder / "chatml_tools.jinja"
    template.write_text(CHATML_TOOLS)
    options = ["--served-model-name", "m", "--chat-template", str(template)]
    options += ["--grammar-compile-timeout", str(COMPILE_TIMEOUT_S)]
    # No compiled decode step: it would compile in the background for minutes, beside the tests that
    # follow (this server lives for the whole session), and these tests need only the eager one.
    options += ["--compile-decode-max-rows", "0"]
    started = launch(checkpoint, folder / "server.log", *options)
    try:
        yield wait_ready(started)
    finally:
        started.stop()


@pytest.fixture(scope="session")
def structured_client(structured_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{structured_server.base_url}/v1", api_key="unused", max_retries=0)
