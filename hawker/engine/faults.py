"""Fault injection for tests: make the forward pass fail for chosen requests.

Installed through ``Engine.pre_execute_hooks`` (the server's hidden
``--inject-fault-token-id`` / ``--inject-fatal-token-id`` flags). A request
whose prompt holds the marker token fails when its prefill chunk runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from hawker.engine.errors import EngineFatalError
from hawker.step import ScheduledSeq


class InjectedFault(RuntimeError):
    """The error an injected fault raises (an ordinary, per-request failure)."""


@dataclass(frozen=True)
class TokenFault:
    """Raise when a step is about to compute a prompt chunk that contains ``token_id``.

    ``fatal`` raises ``EngineFatalError`` instead, which the engine does not
    contain: the engine loop stops, as after an unrecoverable device error.
    """

    token_id: int
    fatal: bool = False

    def __call__(self, seqs: tuple[ScheduledSeq, ...]) -> None:
        for seq in seqs:
            # Prompt tokens only: a generated marker token must not fail a healthy request.
            prompt_part = seq.token_ids[: max(0, seq.num_prompt_tokens - seq.start_pos)]
            if self.token_id in prompt_part:
                error = EngineFatalError if self.fatal else InjectedFault
                raise error(f"injected fault: token {self.token_id} in request {seq.request_id}")
