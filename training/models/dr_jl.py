"""IPS and DR-JL on the BASE network: Wang, Zhang, Sun & Qi, "Doubly Robust Joint Learning for
Recommendation on Data Missing Not at Random", ICML 2019 (IPS: Schnabel et al., ICML 2016).

BASE (esmm.py) trains CVR on clicked impressions only: the naive estimator of a risk whose
labels are missing not at random. These two models keep BASE's network and outputs (ctr, cvr,
ctcvr = ctr x cvr) and replace the CVR tower's loss by an estimate of its entire-space risk:

- ``ips``: R_IPS, clicked rows weighted by 1 / propensity;
- ``dr_jl``: R_DR with an imputation tower, trained jointly (the imputation loss is added to
  the same task loss, with stop-gradients in place of the paper's alternating steps).

The paper estimates propensities with a separately trained model; here it is the BASE
network's own CTR tower, detached from the risk (debias.py). Unlike ESCM² there is no CTCVR
product: pCVR is learnt from the risk alone. ``debias.weight`` does not apply (the risk IS the
CVR loss; scale it with the task's ``loss_weight``); ``clip`` and ``imputation_weight`` do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from training.models.debias import DebiasedFunnel, Method
from training.models.esmm import BASEModel


class _DebiasedBASE(DebiasedFunnel, BASEModel):
    def compute_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        losses = self.task_losses(outputs, labels, label_weights, skip=(self.child,))
        losses[self.child] = self.counterfactual_risk(outputs, labels)
        return {n: losses[n] for n in self.task_names}


class IPSModel(_DebiasedBASE):
    """BASE with the CVR tower trained on the inverse-propensity-weighted risk."""

    method: ClassVar[Method] = "ips"


class DRJLModel(_DebiasedBASE):
    """BASE with the CVR tower trained on the doubly robust risk, jointly with an imputer."""

    method: ClassVar[Method] = "dr"
