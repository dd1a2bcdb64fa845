"""ESCM²: Wang et al., "ESCM²: Entire Space Counterfactual Multi-Task Model for Post-Click
Conversion Rate Estimation", SIGIR 2022.

ESMM (esmm.py) never supervises pCVR directly, so nothing makes pCVR an unbiased estimate on
the impression space: the paper shows it inherits a bias from the CTCVR product. ESCM² keeps
ESMM's network and outputs and adds a counterfactual CVR risk as a regulariser:

    L = L_CTR + λ_c L_CTCVR + λ_g R_CVR,     R_CVR = R_IPS (escm2_ips) or R_DR (escm2_dr)

with the CTR tower's estimate as the propensity and, for DR, an imputation tower beside the CVR
tower (debias.py has the estimators and the reading of the paper behind each choice). The
losses map onto mtrank's one-loss-per-task contract as: ``ctr`` = L_CTR, the funnel child
(``cvr``) = L_CTCVR + ``debias.weight`` x R_CVR (λ_g; under DR plus ``debias.imputation_weight``
x the imputation loss). λ_c is the child task's ``loss_weight``, which therefore scales the
risk too: the effective λ_g is loss_weight x debias.weight. Outputs are ESMM's (ctr, cvr,
ctcvr = ctr x cvr), so fusion and serving see no difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from training.models.debias import DebiasedFunnel, Method
from training.models.esmm import ESMMModel


class _ESCM2(DebiasedFunnel, ESMMModel):
    def compute_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        losses = super().compute_losses(outputs, labels, label_weights)  # ESMM's
        risk = self.counterfactual_risk(outputs, labels)
        losses[self.child] = losses[self.child] + self.risk_weight * risk
        return losses


class ESCM2IPSModel(_ESCM2):
    """ESCM²-IPS: ESMM + λ_g x the inverse-propensity-weighted CVR risk."""

    method: ClassVar[Method] = "ips"


class ESCM2DRModel(_ESCM2):
    """ESCM²-DR: ESMM + λ_g x the doubly robust CVR risk, with an imputation tower."""

    method: ClassVar[Method] = "dr"
