"""Hawker on Ray: the RL-facing rollout actor and the trainer's weight-sync group (needs the ray extra
for the actor; the executor for tensor / pipeline ranks is hawker/distributed/ray_executor.py)."""

from hawker.ray.rollout import RolloutEngine
from hawker.ray.weight_sync import PackedWeights, WeightSpec, WeightSyncGroup, weight_specs

__all__ = ["PackedWeights", "RolloutEngine", "WeightSpec", "WeightSyncGroup", "weight_specs"]
