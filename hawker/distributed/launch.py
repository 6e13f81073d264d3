"""Starting the worker ranks of one node, and finding the ranks torchrun started."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Protocol

from hawker.distributed.world import WorldSpec

logger = logging.getLogger(__name__)

# How often a worker rank checks that its driver is still alive.
PARENT_POLL_S = 0.2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ranks_on_this_node(world_size: int) -> int:
    """How many ranks share this machine's cores: torchrun's LOCAL_WORLD_SIZE, else every rank."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def torchrun_rank(spec_fields: dict[str, Any]) -> tuple[WorldSpec, int] | None:
    """The world torchrun set up for this process (its env variables), or None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "RANK" not in os.environ:
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    spec = WorldSpec(master_addr=os.environ["MASTER_ADDR"], master_port=int(os.environ["MASTER_PORT"]), **spec_fields)
    if spec.world_size != world_size:
        raise ValueError(
            f"torchrun started {world_size} processes but tensor_parallel_size x pipeline_parallel_size "
            f"is {spec.world_size}"
        )
    return spec, int(os.environ["RANK"])


class RankGroup(Protocol):
    """Ranks 1..N-1 as the driver started them (processes here, or Ray actors across a cluster)."""

    def dead(self) -> str | None:
        """Why the world is broken, naming the rank; None while every rank runs."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the ranks to exit after the driver sent Shutdown; kill any that do not."""
        ...

    def kill(self) -> None: ...


class WorkerProcesses:
    """Ranks 1..N-1 of a single-node world, as child processes of the driver."""

    def __init__(self, spec: WorldSpec, engine_options: dict[str, Any]) -> None:
        self.spec = spec
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        for rank in range(1, spec.world_size):
            env = {
                **os.environ,
                "HAWKER_WORLD": json.dumps(asdict(spec)),
                "HAWKER_ENGINE_OPTIONS": json.dumps(engine_options),
                "HAWKER_PARENT_PID": str(os.getpid()),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(spec.world_size),
            }
            # Not torchrun: the worker must not take these for a torchrun launch.
            env.pop("TORCHELASTIC_RUN_ID", None)
            command = [sys.executable, "-m", "hawker.engine.worker"]
            self.processes[rank] = subprocess.Popen(command, env=env)
        logger.info("started %d worker rank(s): pids %s", len(self.processes), [p.pid for p in self.processes.values()])

    def dead(self) -> str | None:
        """Why the world is broken: the first worker that exited, or None while all run."""
        for rank, process in self.processes.items():
            code = process.poll()
            if code is not None:
                return f"rank {rank} (pid {process.pid}) exited with code {code}"
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers to exit (after the driver sent Shutdown); kill any that do not."""
        for process in self.processes.values():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not exit; killing it", process.pid)
                process.kill()
                process.wait()

    def kill(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait()


def die_with_parent(parent_pid: int) -> None:
    """This process exits when its parent (the driver) dies, however it dies.

    A watcher thread polls the parent pid: an orphan is re-parented, so its
    parent pid changes. Not ``PR_SET_PDEATHSIG``: Linux sends that signal
    when the *thread* that started the process exits, and the server starts
    its ranks from a short-lived build thread (``build_off_main_thread``).
    """
    if os.getppid() != parent_pid:  # the parent died before the watcher started
        sys.exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # no clean-up to wait for: the driver that would coordinate it is gone

    threading.Thread(target=watch, name="hawker-parent-watch", daemon=True).start()
