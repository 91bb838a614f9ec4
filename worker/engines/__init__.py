"""Engines move bytes and offsets; every decision is in `worker.pipeline`.

`confluent` is the main engine. `faust` is imported only when asked for, so `import worker`
never pulls faust-streaming in.
"""
