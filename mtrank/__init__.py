"""mtrank: multi-task ranking for recommender systems.

This small package is the contract shared by the two halves: the feature spec written beside every
exported model (:mod:`mtrank.spec`), the binary layout of feature snapshots
(:mod:`mtrank.snapshot`),
the model registry on disk (:mod:`mtrank.registry`) and the ``mtrank`` command line. It imports
neither torch nor the web stack, so both the trainer and the service depend on it.
"""

__version__ = "0.1.0"
