"""The recall stage, offline: candidate retrieval models trained on click sequences.

data -> models -> losses -> train loop -> evaluation (against popularity and co-occurrence)
-> export of the user tower (ONNX) and the item embedding matrix for the ANN index. The
serving contract is :mod:`mtrank.recall_spec`. Importing this package loads no torch (the
generator imports ``titles`` from it).
"""
