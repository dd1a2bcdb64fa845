"""Entire Space Multi-task Model (ESMM) and its BASE baseline: Ma et al., "Entire Space Multi-Task
Model: An Effective Approach for Estimating Post-Click Conversion Rate", SIGIR 2018.

A funnel is a pair of binary tasks where the child ``depends_on`` the parent (cvr on ctr): a
conversion can only follow a click. Training pCVR on clicked impressions only (BASE) suffers
from sample selection bias (it is served on all impressions) and from data sparsity. ESMM
instead models, over the entire impression space,

    pCTCVR = pCTR x pCVR,

and supervises pCTR with the click label and pCTCVR with click x conversion, both on all
impressions; pCVR is never supervised directly. Both models share embeddings and a bottom
(``esmm_bottom``: shared_bottom, mmoe or ple) and output ctr, cvr and ``ctcvr``. Tasks outside
the funnel (cart, stay, ...) get their own towers on the same bottom and their ordinary losses.

The funnel is found from the tasks' ``depends_on``, never from names: it is the FIRST task in
dataset order that depends on another, with its parent. Further dependent tasks (cart and collect
also follow a click in the ecommerce data) keep ordinary towers and the base model's conditional
loss (on rows where the parent is positive), so an output such as ``cart`` means P(cart | click)
whichever model produced it. The joint output is called ``ctcvr`` (the paper's name). BASE is
exactly the base model's conditional training plus the joint output.

Label weights (see models.base): BASE corrects each of ctr and cvr by its logit shift. For ESMM,
the child's label weight w_c weights the positives of the CTCVR loss, whose prediction is a
product, not one sigmoid, so no logit can be shifted. The correction is applied to the
components instead: at the weighted optimum the CTR tower learns odds x w_p and the product learns
ctcvr odds x w_c, so predict() divides the product's odds by w_c, takes ctr = sigmoid(logit -
log w_p), and derives cvr = ctcvr / ctr (clipped to [0, 1]) and ctcvr = ctr x cvr. This is exact
as long as the weighted ctcvr stays below the weighted ctr (w_c not much larger than w_p).

Delayed conversions (``model.delayed_feedback``, training/models/delayed.py): with a method other
than naive, the child's loss (BASE: the clicked-only CVR loss; ESMM: the CTCVR loss) becomes that
method's loss on the same probability, and the method's training-only heads read the child's
representation; ``predict`` and so the exported graph are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrank.spec import FeatureSpec
from training.config import ConfigError, ModelConfig, TaskColumn, TaskWeights
from training.models import delayed
from training.models.base import (
    RATE_EPS,
    Bottom,
    MultiTaskModel,
    funnel_pairs,
    logit,
    probability_bce,
)
from training.models.mmoe import MMoEBottom
from training.models.ple import PLEBottom
from training.models.shared_bottom import SharedBottom

JOINT = "ctcvr"
_BOTTOMS: dict[str, type[Bottom]] = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoEBottom,
    "ple": PLEBottom,
}


class _FunnelModel(MultiTaskModel):
    """Shared structure of ESMM and BASE; they differ in the child's loss and its calibration."""

    def __init__(
        self,
        cfg: ModelConfig,
        spec: FeatureSpec,
        tasks: Sequence[TaskColumn],
        weights: Mapping[str, TaskWeights] | None = None,
    ) -> None:
        pairs = funnel_pairs(tasks)
        if not pairs:
            raise ConfigError(
                f"model {type(self).__name__} needs a funnel: a task with depends_on (cvr on ctr)"
            )
        parent, child = pairs[0]  # the first dependent task in dataset order
        if parent.kind != "binary" or child.kind != "binary":
            raise ConfigError(f"funnel tasks {parent.name!r}, {child.name!r} must be binary")
        if JOINT in {t.name for t in tasks}:
            raise ConfigError(f"a task may not be named {JOINT!r}: it is the funnel's joint output")
        super().__init__(cfg, spec, tasks, weights)
        self.parent, self.child = parent.name, child.name
        self.others = [n for n in self.task_names if n not in (self.parent, self.child)]
        self.child_index = self.task_names.index(self.child)
        self.delayed = delayed.build(
            cfg.delayed_feedback, child, self.bottom.out_dim, cfg.tower_units, cfg.dropout
        )
        if self.delayed is not None:
            self._check_delayed_feedback()

    def _check_delayed_feedback(self) -> None:
        clash = sorted(set(delayed.RESERVED) & set(self.task_names))
        if clash:
            raise ConfigError(f"task names {clash} are reserved for delayed-feedback outputs")
        for name in (self.parent, self.child):
            if self.label_weights[name] != 1.0:
                raise ConfigError(
                    f"tasks.{name}.label_weight: model.delayed_feedback takes no label weight on "
                    "the funnel's tasks (it would move the delayed-feedback optimum, not undone "
                    "by predict)"
                )

    def forward(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        reps = self.bottom(sparse, dense)  # T x (B, d)
        out = self.heads(reps)
        if self.delayed is not None:  # training-only heads; predict serves the task outputs
            out |= self.delayed(reps[self.child_index])
        return out

    def loss_rows(self, name: str, labels: Mapping[str, Tensor]) -> float:
        if self.delayed is not None and name == self.child:
            target, scope = self.delayed_rows(labels)
            return self.delayed.rows(target, labels, scope)
        return super().loss_rows(name, labels)

    def delayed_rows(self, labels: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(target, scope) of the child's delayed-feedback loss: the observed label it fits and
        1 on the rows it covers. BASE: the child label on clicked rows (overridden by ESMM)."""
        return labels[self.child], labels[self.parent]

    def delayed_rate(self, base_rates: Mapping[str, float]) -> float:
        """The target's base rate over the scope of :meth:`delayed_rows` (BASE: P(child |
        parent); overridden by ESMM)."""
        return base_rates[self.child]

    @torch.no_grad()
    def init_output_bias(self, base_rates: Mapping[str, float]) -> dict[str, float]:
        biases = super().init_output_bias(base_rates)
        if self.delayed is not None:
            self.delayed.init_bias(self.delayed_rate(base_rates))
        return biases

    def build_bottom(self, cfg: ModelConfig, spec: FeatureSpec, n_towers: int) -> Bottom:
        return _BOTTOMS[cfg.esmm_bottom](cfg, spec, n_towers)

    @property
    def output_names(self) -> list[str]:
        return [*self.task_names, JOINT]

    @property
    def joint_outputs(self) -> dict[str, tuple[str, str]]:
        return {JOINT: (self.parent, self.child)}


class ESMMModel(_FunnelModel):
    """ESMM: CTR loss and CTCVR loss on all impressions; the child's loss key is its task name."""

    def compute_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        lw = self.label_weights if label_weights is None else label_weights
        losses = self.task_losses(outputs, labels, lw, skip=(self.child,))
        a, b = outputs[self.parent], outputs[self.child]  # (B,), (B,) logits
        y = labels[self.parent] * labels[self.child]  # (B,) click x conversion
        log_p = F.logsigmoid(a) + F.logsigmoid(b)  # (B,) log pCTCVR
        p = torch.exp(log_p).clamp(max=1.0 - 1e-7)  # (B,)
        if self.delayed is None:
            losses[self.child] = probability_bce(log_p, torch.log1p(-p), y, lw.get(self.child, 1.0))
        else:  # conversions still to come: the delayed-feedback loss of the same product
            y, scope = self.delayed_rows(labels)
            losses[self.child] = self.delayed.loss(
                log_p, torch.log1p(-p), y, outputs, labels, scope
            )
        return {n: losses[n] for n in self.task_names}

    def delayed_rows(self, labels: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Every impression, fitting click x conversion."""
        y = labels[self.parent] * labels[self.child]  # (B,)
        return y, torch.ones_like(y)

    def delayed_rate(self, base_rates: Mapping[str, float]) -> float:
        return base_rates[self.parent] * base_rates[self.child]

    def output_biases(self, base_rates: Mapping[str, float]) -> dict[str, float]:
        """The child's sigmoid multiplies the parent's: start the product at the (label-weighted)
        CTCVR optimum, whose odds are w_c x odds(P(parent) x P(child | parent))."""
        out = super().output_biases(base_rates)
        joint = base_rates[self.parent] * base_rates[self.child]
        odds = self.label_weights[self.child] * joint / max(1.0 - joint, RATE_EPS)
        ctr = 1.0 / (1.0 + math.exp(-out[self.parent]))  # the parent tower's starting output
        out[self.child] = logit(odds / (1.0 + odds) / ctr)
        return out

    def loss_rows(self, name: str, labels: Mapping[str, Tensor]) -> float:
        if name == self.child and self.delayed is None:  # the CTCVR loss covers every impression
            return float(len(labels[name]))
        return super().loss_rows(name, labels)

    def predict(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        raw = self(sparse, dense)
        out = self.calibrated({n: raw[n] for n in self.task_names})
        w_p, w_c = self.label_weights[self.parent], self.label_weights[self.child]
        if w_p == 1.0 and w_c == 1.0:
            ctr, cvr = out[self.parent], torch.sigmoid(raw[self.child])  # (B,), (B,)
        else:
            q = torch.sigmoid(raw[self.parent]) * torch.sigmoid(raw[self.child])  # (B,) weighted
            ctcvr = q / (q + w_c * (1.0 - q))  # (B,) odds / w_c
            ctr = out[self.parent]  # (B,) already shifted by log w_p
            cvr = (ctcvr / ctr.clamp(min=1e-12)).clamp(0.0, 1.0)  # (B,)
        out[self.child] = cvr
        out[JOINT] = ctr * cvr  # (B,)
        return out


class BASEModel(_FunnelModel):
    """The paper's BASE: the same network, CTR on all impressions, CVR on clicked ones only.

    That is the base model's conditional loss unchanged (models.base); BASE adds ``ctcvr``.
    """

    def compute_losses(
        self,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        label_weights: Mapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        if self.delayed is None:
            return super().compute_losses(outputs, labels, label_weights)
        losses = self.task_losses(outputs, labels, label_weights, skip=(self.child,))
        x = outputs[self.child]  # (B,) CVR logit
        y, scope = self.delayed_rows(labels)
        losses[self.child] = self.delayed.loss(
            F.logsigmoid(x), F.logsigmoid(-x), y, outputs, labels, scope
        )
        return {n: losses[n] for n in self.task_names}

    def predict(self, sparse: Tensor, dense: Tensor) -> dict[str, Tensor]:
        out = self.calibrated(self(sparse, dense))
        out[JOINT] = out[self.parent] * out[self.child]  # (B,)
        return out
