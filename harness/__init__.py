"""Real processes for tests and benchmarks, never shipped.

- :mod:`harness.processes`: a private ``redis-server`` and ``mtrank serve`` on free loopback
  ports, HTTP probes, a worker's resident memory.
- :mod:`harness.load`: a raw keep-alive HTTP/1.1 load client that records every answer and drop.
- :mod:`harness.trained`: a tiny model trained, exported and snapshotted by the real pipeline.
- :mod:`harness.stack`: a whole serving stack (Redis with the snapshot + ``mtrank serve``).

It sits beside the CLI on top of the product (it drives training/ and runs the service as a
process); tests/ and bench/ both import it, and neither imports the other.
"""
