"""mtrank: multi-task ranking for recommender systems.

This small package is the contract shared by the two halves: the feature spec written beside every
exported model (:mod:`mtrank.spec`), the binary layout of feature snapshots and their Redis keys
(:mod:`mtrank.snapshot`, :mod:`mtrank.snapshot_loader`), the model registry on disk
(:mod:`mtrank.registry`), the fusion grammar (:mod:`mtrank.fusion`) and strict YAML loading
(:mod:`mtrank.yamlio`). It imports neither torch nor the web stack nor either half, so both the
trainer and the service depend on it.

:mod:`mtrank.cli` (the ``mtrank`` command line and ``mtrank demo``) is the exception: it sits on
top of both halves. The import-linter contracts in pyproject.toml hold these layers.
"""

__version__ = "0.1.0"
