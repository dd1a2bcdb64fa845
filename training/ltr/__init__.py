"""Learned fusion: learning to rank over the multi-task model's outputs (LambdaMART, BPR), and
the single-model LTR baseline over the raw features; published as ``ltr`` registry versions
(mtrank.ltr_artefact) that the service scores with service/fusion_model.py."""
