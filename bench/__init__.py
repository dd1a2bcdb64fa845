"""Benchmarks of model quality, training throughput and serving: ``python -m bench.run_all``.

Results are committed as small JSON files under ``bench/results/`` and summarised, with the
command that regenerates each one, in ``docs/benchmarks.md``.
"""
