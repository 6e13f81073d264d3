"""Tensor x pipeline ranks as Ray actors: ``--distributed-executor-backend ray``.

Rank 0 (the driver: scheduler, sampling, the API) stays in this process.
Ranks 1..N-1 run as actors placed by a placement group with one bundle per
rank; bundle 0 holds the driver's share and is pinned to this node, so the
ranks that share it are counted right. Steps and collectives go over
torch.distributed exactly as with local processes (hawker/distributed/
world.py: gloo on CPU, NCCL on GPU); Ray only places, starts, watches and
stops the ranks. Ray is imported only here, when the backend is asked for.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import asdict
from typing import Any

import torch

from hawker.distributed.launch import free_port
from hawker.distributed.world import WorldSpec

logger = logging.getLogger(__name__)

# How long the cluster may take to find room for every bundle before start-up fails.
PLACEMENT_TIMEOUT_S = 120.0
# How long a cluster's address may take to accept a connection.
CONNECT_TIMEOUT_S = 5.0
# How long freeing the actors and the placement group may take at shutdown.
RELEASE_TIMEOUT_S = 10.0
# Ray labels every node with its id; a bundle selecting it lands on that node.
NODE_ID_LABEL = "ray.io/node-id"
# Environment variables the ranks need as the driver sees them (a remote node's raylet has its own):
# Hawker's, the collectives' (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, TORCH_NCCL_...), offline flags.
FORWARDED_ENV_PREFIXES = ("HAWKER_", "NCCL_", "GLOO_", "TORCH_", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise ValueError(
            "--distributed-executor-backend ray needs Ray: pip install 'hawker[ray]' (or pip install ray)"
        ) from error
    return ray


def connect_ray(address: str | None) -> Any:
    """Join the Ray cluster at ``address`` (ray.init's: None = RAY_ADDRESS, else one started on this
    node, else a new local one), unless this process already has; returns the ray module.

    A new local cluster's processes die with the *thread* that started them
    (Ray starts them with PR_SET_PDEATHSIG): call this from a thread that
    lives as long as the engine.
    """
    ray = import_ray()
    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = "a new local cluster" if address is None else f"the cluster at {address!r}"
            raise ValueError(f"could not start or join Ray ({where}): {error}") from error
    return ray


def check_reachable(address: str | None) -> None:
    """Refuse a ``host:port`` cluster address that nothing answers on: Ray itself retries for minutes."""
    if address is None or address.count(":") != 1 or "://" in address:
        return  # None, "auto", "local", a ray:// client address: for ray.init to resolve
    host, port = address.rsplit(":", 1)
    if not port.isdigit():
        raise ValueError(f"ray_address {address!r} is not host:port")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ValueError(f"no Ray cluster answers at {address!r}: {error}") from error


def rank_bundle(device: str) -> dict[str, float]:
    """What one rank reserves: a GPU on CUDA (Ray then shows the actor only that GPU), else a CPU."""
    return {"GPU": 1.0} if torch.device(device).type == "cuda" else {"CPU": 1.0}


class RayRanks:
    """Ranks 1..N-1 as Ray actors in a placement group of the cluster at ``address``.

    ``dead()`` names the first rank whose actor ended (killed, crashed, or
    its node lost); ``stop()`` and ``kill()`` end the actors and free the
    placement group.
    """

    def __init__(
        self, shape: dict[str, int], options: dict[str, Any], address: str | None, device: str, actor_class: type
    ) -> None:
        self._ray = ray = connect_ray(address)
        world_size = shape["tensor_parallel_size"] * shape["pipeline_parallel_size"]
        bundle = rank_bundle(device)
        # Inside an actor that an RL framework placed in its placement group (with
        # placement_group_capture_child_tasks), the ranks take that group's bundles 1..N-1 and
        # bundle 0 is taken to be the caller's; else Hawker reserves a group of its own.
        inherited = ray.util.get_current_placement_group()
        self._owns_placement = inherited is None
        if inherited is None:
            self.placement = place_ranks(ray, world_size, bundle)
        elif len(inherited.bundle_specs) < world_size:
            raise ValueError(
                f"this actor's placement group has {len(inherited.bundle_specs)} bundle(s); {world_size} ranks "
                "need one each (the engine's own process in bundle 0)"
            )
        else:
            self.placement = inherited
        addresses = bundle_addresses(ray, self.placement, world_size)
        addresses[0] = ray.util.get_node_ip_address()  # rank 0 is this process, wherever it runs
        # The driver's node address, where every rank meets (torch.distributed's TCP store).
        self.spec = WorldSpec(addresses[0], free_port(), **shape)
        self.ranks_on_driver_node = addresses.count(addresses[0])
        self.addresses = addresses
        self.actors: dict[int, Any] = {}
        self.runs: dict[int, Any] = {}
        try:
            self._start_actors(actor_class, options, bundle)
        except BaseException:
            self.kill()
            raise
        logger.info("started %d rank(s) as Ray actors on %s", len(self.actors), addresses[1:])

    def _start_actors(self, actor_class: type, options: dict[str, Any], bundle: dict[str, float]) -> None:
        """One actor of ``actor_class`` per rank 1..N-1; its ``run(options, spec, rank, ranks_here)``
        joins the world and serves steps until Shutdown (hawker.engine.worker.RayRankActor)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        remote_class = self._ray.remote(actor_class)
        env = {name: value for name, value in os.environ.items() if name.startswith(FORWARDED_ENV_PREFIXES)}
        for rank in range(1, len(self.addresses)):
            actor = remote_class.options(
                num_cpus=bundle.get("CPU", 0.0),
                num_gpus=bundle.get("GPU", 0.0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
                runtime_env={"env_vars": env},
            ).remote()
            self.actors[rank] = actor
            ranks_here = self.addresses.count(self.addresses[rank])
            self.runs[rank] = actor.run.remote(options, asdict(self.spec), rank, ranks_here)

    def dead(self) -> str | None:
        if not self.runs:
            return None
        ready, _ = self._ray.wait(list(self.runs.values()), num_returns=1, timeout=0)
        if not ready:
            return None
        rank = next(rank for rank, run in self.runs.items() if run == ready[0])
        return f"rank {rank} (Ray actor on {self.addresses[rank]}) {self._why_ended(ready[0])}"

    def _why_ended(self, run: Any) -> str:
        try:
            self._ray.get(run, timeout=0)
        except Exception as error:
            # Ray's errors end with the cause: "... killed by `ray.kill`." or the rank's own exception.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            return f"died: {type(error).__name__}: {lines[-1] if lines else ''}"
        return "exited"

    def stop(self, timeout: float = 10.0) -> None:
        runs = list(self.runs.values())
        if runs:
            _, pending = self._ray.wait(runs, num_returns=len(runs), timeout=timeout)
            if pending:
                logger.warning("%d Ray rank(s) did not exit; killing them", len(pending))
        self.kill()

    def kill(self) -> None:
        """Kill the actors and free the placement group; bounded in time, since Ray's calls wait for
        as long as its control service is unreachable (a lost head node)."""
        actors, placement = list(self.actors.values()), self.placement if self._owns_placement else None
        self.actors.clear()
        self.runs.clear()
        self.placement = None

        def release() -> None:
            for actor in actors:
                self._ray.kill(actor)
            if placement is not None:
                self._ray.util.remove_placement_group(placement)

        releasing = threading.Thread(target=release, name="hawker-ray-release", daemon=True)
        releasing.start()
        releasing.join(RELEASE_TIMEOUT_S)
        if releasing.is_alive():
            logger.warning("Ray did not release the ranks in %.0f s (is its cluster still up?)", RELEASE_TIMEOUT_S)


def place_ranks(ray: Any, world_size: int, bundle: dict[str, float]) -> Any:
    """A placement group of one bundle per rank, bundle 0 (the driver's) on this node; PACK keeps
    ranks together where they fit, as tensor-parallel all-reduces want."""
    needed = {name: amount * world_size for name, amount in bundle.items()}
    total = ray.cluster_resources()
    short = {name: amount for name, amount in needed.items() if total.get(name, 0.0) < amount}
    if short:
        raise ValueError(f"the Ray cluster has {total} in all; {world_size} ranks need {needed}")
    here = ray.get_runtime_context().get_node_id()
    selectors = [{NODE_ID_LABEL: here}] + [{} for _ in range(world_size - 1)]
    group = ray.util.placement_group([bundle] * world_size, strategy="PACK", bundle_label_selector=selectors)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as error:
        ray.util.remove_placement_group(group)
        raise ValueError(
            f"Ray found no room for {world_size} bundles of {bundle} (the first on this node) in "
            f"{PLACEMENT_TIMEOUT_S:.0f} s; available now: {ray.available_resources()}"
        ) from error
    return group


def bundle_addresses(ray: Any, group: Any, world_size: int) -> list[str]:
    """The address of the node each bundle (rank) landed on."""
    node_of_bundle = ray.util.placement_group_table(group)["bundles_to_node_id"]
    address_of_node = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    return [address_of_node[node_of_bundle[rank]] for rank in range(world_size)]
