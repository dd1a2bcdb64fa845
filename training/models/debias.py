"""Post-click conversion rate without selection bias: the IPS and doubly robust CVR risks.

Shared by ESCM² (escm2.py: ESMM plus a counterfactual risk) and by IPS / DR-JL (dr_jl.py: the
risk replaces BASE's clicked-only CVR loss). A CVR model trained on clicked impressions only
learns P(buy | click) for the items people click, not for the impressions it is served on; these
risks reweight the clicked rows so that their mean estimates the loss over the entire impression
space D. Per impression i of a batch (which samples D):

    o_i        the click (the parent label): whether the conversion label is observed
    r_i        the conversion label (the child label; read where o_i = 1 only)
    x_i        the CVR tower's logit, r̂_i = sigmoid(x_i) the pCVR
    e_i        = BCE(r_i, r̂_i), the prediction error
    p̂_i        the propensity: the CTR tower's calibrated pCTR, floored at ``debias.clip``
    w_i        = o_i / p̂_i, the IPS weight (0 on impressions without a click)

    IPS  (Schnabel et al., ICML 2016):  R_IPS = 1/|D| Σ_i w_i e_i
    DR   (Wang et al., ICML 2019):      R_DR  = 1/|D| Σ_i [ ê_i + w_i (e_i - ê_i) ]
         imputation loss:               L_imp = 1/|D| Σ_i w_i (e_i - ê_i)²

Choices, each a deliberate reading of the papers:

- The propensity is the model's own CTR tower (ESCM² uses its CTR tower; DR-JL a separately
  trained propensity model, here the BASE network's CTR tower) and is detached: the CTR tower
  learns from its click loss only. With the gradient, the risk would raise pCTR on clicked rows
  just to shrink its own weights. Floored at ``clip`` so one rare click cannot dominate a batch.
- The imputed error is ê_i = BCE(r̃_i, r̂_i): the prediction's error against a pseudo-label
  r̃_i = sigmoid(imputation tower) computed on EVERY impression. A free-standing ê would be a
  constant for the CVR tower and DR's gradient would equal IPS's; written this way the
  impressions without a click pull r̂ towards the imputed label, which is what DR adds.
- Joint learning (DR-JL) alternates a prediction step (imputation fixed) and an imputation step
  (prediction fixed). Here both are one loss with stop-gradients: R_DR sees r̃ detached, L_imp
  sees r̂ and e detached, so one optimiser step gives each tower exactly its own step's gradient.
  The imputation tower reads the CVR task's representation, so the shared layers learn from both.

A risk is a mean over the whole batch (|D|, not the clicked rows): with w the IPS weights its
expectation is the entire-space mean error. Label weights on the funnel's two tasks are refused
by these models: the weight would shift the IPS and the CTCVR optima differently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtrank.spec import FeatureSpec
from training.config import ConfigError, DebiasConfig, ModelConfig, TaskColumn, TaskWeights
from training.models.esmm import _FunnelModel
from training.models.layers import Tower

log = logging.getLogger(__name__)

IMPUTED = "_imputed_cvr"  # forward()'s extra output under DR: the pseudo-label's logit (B,)
Method = Literal["ips", "dr"]


def bce_with_logits(logit: Tensor, target: Tensor) -> Tensor:
    """Per-row BCE, differentiable in the logit AND in a soft target: softplus(x) - y x."""
    return F.softplus(logit) - target * logit  # (B,)


def ips_weights(click: Tensor, ctr: Tensor, clip: float) -> Tensor:
    """w = o / max(pCTR, clip): 1 / clipped propensity on clicked rows, 0 elsewhere. (B,)"""
    return click / ctr.detach().clamp(min=clip)  # (B,) no gradient into the CTR tower


def ips_risk(err: Tensor, w: Tensor) -> Tensor:
    """R_IPS = mean_i w_i e_i over every impression."""
    return (w * err).mean()


def dr_risk(err: Tensor, imputed_err: Tensor, w: Tensor) -> Tensor:
    """R_DR = mean_i [ê_i + w_i (e_i - ê_i)] over every impression (ê from a fixed imputer)."""
    return (imputed_err + w * (err - imputed_err)).mean()


def imputation_loss(err: Tensor, imputed_err: Tensor, w: Tensor) -> Tensor:
    """L_imp = mean_i w_i (e_i - ê_i)² over every impression (e from a fixed predictor)."""
    return (w * (err - imputed_err) ** 2).mean()


class CounterfactualRisk(nn.Module):
    """The IPS or DR risk of one funnel's CVR tower; under DR, owns the imputation tower.

    Args:
        method: ``ips`` or ``dr``.
        cfg: clip and imputation weight.
        in_dim: width of the representation the imputation tower reads (the CVR task's).
        units, dropout: the imputation tower's MLP, as the task towers'.
    """

    def __init__(
        self, method: Method, cfg: DebiasConfig, in_dim: int, units: list[int], dropout: float
    ) -> None:
        super().__init__()
        self.method = method
        self.clip = cfg.clip
        self.imputation_weight = cfg.imputation_weight
        self.imputation = Tower(in_dim, units, dropout) if method == "dr" else None

    def forward(
        self,
        cvr_logit: Tensor,
        label: Tensor,
        click: Tensor,
        ctr: Tensor,
        imputed_logit: Tensor | None,
    ) -> Tensor:
        """(B,) CVR logits, conversion labels, clicks, calibrated pCTR [, pseudo-label logits]
        -> the scalar risk (plus, under DR, imputation_weight x the imputation loss)."""
        w = ips_weights(click, ctr, self.clip)  # (B,)
        label = torch.where(click > 0, label, 0.0)  # (B,) unobserved rows: any finite value
        err = bce_with_logits(cvr_logit, label)  # (B,) e_i
        if self.method == "ips":
            return ips_risk(err, w)
        if imputed_logit is None:
            raise ValueError("the DR risk needs the imputation tower's output")
        r_tilde = torch.sigmoid(imputed_logit)  # (B,) pseudo-label on every impression
        risk = dr_risk(err, bce_with_logits(cvr_logit, r_tilde.detach()), w)  # prediction step
        imp_err = bce_with_logits(cvr_logit.detach(), r_tilde)  # (B,) ê, imputer's gradient only
        return risk + self.imputation_weight * imputation_loss(err.detach(), imp_err, w)


class DebiasedFunnel(_FunnelModel):
    """A funnel model (ESMM or BASE network) with a counterfactual CVR risk.

    Subclasses set ``method`` and say how the risk enters the child's loss. Under DR the
    ``forward`` dict carries one more entry after the tasks, :data:`IMPUTED`.
    """

    method: ClassVar[Method]

    def __init__(
        self,
        cfg: ModelConfig,
        spec: FeatureSpec,
        tasks: Sequence[TaskColumn],
        weights: Mapping[str, TaskWeights] | None = None,
    ) -> None:
        if IMPUTED in {t.name for t in tasks}:
            raise ConfigError(f"a task may not be named {IMPUTED!r}: it is an internal output")
        super().__init__(cfg, spec, tasks, weights)
        for name in (self.parent, self.child):
            if self.label_weights[name] != 1.0:
                raise ConfigError(
                    f"tasks.{name}.label_weight: the debiased funnel models take no label weight "
                    "on the funnel's tasks (it would shift the IPS and CTCVR optima differently)"
                )
        self.child_index = self.task_names.index(self.child)
        self.risk = CounterfactualRisk(
            self.method, cfg.debias, self.bottom.out_dim, cfg.tower_units, cfg.dropout
        )
        self.risk_weight = cfg.debias.weight  # λ_g where the risk is a regulariser (ESCM²)
        log.info(
            "%s: %s risk on %s, propensity %s floored at %g, ESCM² weight %g, imputation weight %g",
            type(self).__name__,
            self.method.upper(),
            self.child,
            self.parent,
            cfg.debias.clip,
            cfg.debias.weight,
            cfg.debias.imputation_weight,
        )

    @torch.no_grad()
    def init_output_bias(self, base_rates: Mapping[str, float]) -> dict[str, float]:
        """The task towers as every model's; under DR the pseudo-label starts at the base CVR."""
        biases = super().init_output_bias(base_rates)
        if self.risk.imputation is not None:
            self.risk.imputation.out.bias.fill_(biases[self.child])
        return biases

    def forward(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        reps = self.bottom(sparse, dense)  # T x (B, d)
        out = {
            name: tower(h)  # (B,)
            for name, tower, h in zip(self.task_names, self.towers, reps, strict=True)
        }
        if self.risk.imputation is not None:
            out[IMPUTED] = self.risk.imputation(reps[self.child_index])  # (B,)
        return out

    def counterfactual_risk(
        self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]
    ) -> Tensor:
        """The child's IPS / DR risk, the CTR tower's output as the propensity."""
        ctr = torch.sigmoid(outputs[self.parent])  # (B,) calibrated: no label weight here
        risk: Tensor = self.risk(
            outputs[self.child], labels[self.child], labels[self.parent], ctr, outputs.get(IMPUTED)
        )
        return risk

    def loss_rows(self, name: str, labels: Mapping[str, Tensor]) -> float:
        if name == self.child:  # the risk is a mean over every impression
            return float(len(labels[name]))
        return super().loss_rows(name, labels)
