"""Several processes, one model: tensor and pipeline parallelism over torch.distributed.

Rank 0 (the driver) owns the scheduler and the KV block pool; every step it
broadcasts the ``SchedulerOutput`` to the other ranks, all ranks run their
shard of the model, and the last pipeline stage's first tensor-parallel rank
returns the sampled tokens to the driver.
"""
