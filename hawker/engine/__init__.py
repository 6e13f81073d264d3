"""Engine core: requests, scheduler, KV cache manager, model runner, sampler."""
