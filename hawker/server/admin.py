"""Admin routes for a trainer driving the server: pause, resume, weight updates, sleep.

They exist only on a server started with an API key (``--api-key``), which
every request, these included, must then carry; without one they answer
403, so an open server never lets a caller swap its weights. Each operation
runs on every replica's engine thread between two steps
(``AsyncEngine.call``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from hawker.engine.async_engine import AsyncEngine
from hawker.engine.engine import Engine
from hawker.loader.update_files import confined_directory
from hawker.server.errors import APIError, error_responses


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["abort", "keep"] = "abort"


class UpdateWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # A directory of safetensors files with Hugging Face names (all or some of the weights). Only files
    # inside it are read, and it must lie under one of the server's --allowed-weight-roots if any are set.
    path: str


class SleepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: Literal[1, 2] = 1


_ADMIN_ERRORS = error_responses(400, 401, 403, 413)


def add_admin_routes(
    app: FastAPI, replicas: list[AsyncEngine], api_key: str | None, allowed_weight_roots: Sequence[Path] = ()
) -> None:
    def require_admin() -> None:
        if not api_key:
            raise APIError(403, "admin endpoints need the server to be started with --api-key", code="forbidden")

    async def on_every_replica(operation: Callable[[Engine], Any], param: str | None = None) -> list[Any]:
        require_admin()
        try:
            return [await replica.call(operation) for replica in replicas]
        except ValueError as error:
            raise APIError(400, str(error), param=param) from error

    @app.post("/admin/pause", responses=_ADMIN_ERRORS)
    async def pause(body: PauseRequest) -> dict[str, Any]:
        finished = await on_every_replica(lambda engine: engine.pause_generation(body.mode))
        return {"paused": True, "aborted_requests": sum(len(outputs) for outputs in finished)}

    @app.post("/admin/resume", responses=_ADMIN_ERRORS)
    async def resume() -> dict[str, Any]:
        await on_every_replica(lambda engine: engine.resume_generation())
        return {"paused": False}

    @app.post("/admin/update_weights", responses=_ADMIN_ERRORS)
    async def update_weights(body: UpdateWeightsRequest) -> dict[str, Any]:
        require_admin()  # before the path is looked at: an open server says nothing about its files
        try:
            directory = confined_directory(body.path, allowed_weight_roots)
        except ValueError as error:
            raise APIError(400, str(error), param="path") from None
        versions = await on_every_replica(lambda engine: engine.update_weights(directory), param="path")
        return {"weight_version": max(versions)}

    @app.post("/admin/sleep", responses=_ADMIN_ERRORS)
    async def sleep(body: SleepRequest) -> dict[str, Any]:
        await on_every_replica(lambda engine: engine.sleep(body.level))
        return {"sleeping": body.level}

    @app.post("/admin/wake_up", responses=_ADMIN_ERRORS)
    async def wake_up() -> dict[str, Any]:
        await on_every_replica(lambda engine: engine.wake_up())
        return {"sleeping": 0}
