"""The recall stage, online: candidate retrieval from the ANN index the training side built."""
