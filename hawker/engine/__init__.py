"""Engine core: one step is schedule -> execute -> update (engine.py).

Where a request is scheduled: ``Scheduler.schedule`` (scheduler.py), over the
KV block pool and prefix cache (kv_cache.py). Where it runs: a ``Runner``
(runner.py: model_runner.py in one process, driver_runner.py over several).
Where it stops: ``Scheduler.update`` and ``check_stop`` (scheduler.py), and
stop strings in the output processor. Where its output is built:
``OutputProcessor`` (output_processor.py). The step's values themselves are
hawker/step.py's; options become an ``EngineConfig`` in configure.py.
"""
