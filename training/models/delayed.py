"""Delayed feedback: a funnel's conversions arrive hours or days after the click, so at the
training cut-off a click without a conversion is either a real negative or a conversion still
to come (a fake negative). Options of the funnel child's loss in ESMM and BASE (esmm.py),
chosen by ``model.delayed_feedback.method``.

Per row of the child's loss (BASE: the clicked rows; ESMM: every impression, whose target is
click x conversion):

    y   the label as observed at the cut-off
    e   days from the click (the impression) to the cut-off      (the task's ``elapsed`` column)
    d   days from the click to the conversion, read where y = 1  (the task's ``delay`` column)
    p   the model's conversion probability (BASE: pCVR; ESMM: pCTR x pCVR)

- ``naive``: the model's own loss; a conversion still to come counts as a negative, so p is
  biased down by the share of conversions not yet seen. No module here (``build`` gives None).
- ``window``: the same BCE on the rows with e >= ``window_days`` only. Older clicks have more of
  their conversions in, at the price of the freshest data; slower conversions are still missed.
- ``dfm``: Chapelle, "Modeling Delayed Feedback in Display Advertising", KDD 2014. The
  conversion C and its delay D given x: P(C = 1 | x) = p and D | C = 1 ~ Exponential(λ(x)). At
  the cut-off a row was either seen converting after d days or not yet:

      P(y = 1, d | x) = p λ exp(-λ d)             P(y = 0 | x, e) = 1 - p + p exp(-λ e)

  and the negative log-likelihood of both is minimised jointly in p and λ. λ(x) = exp(z), z a
  delay head on the child's representation, as Chapelle writes it (exp(w_d . x)); z is clipped to
  [-20, 20] so λ stays finite. (The ES-DFM authors' DFM uses softplus(z): with delays from an hour
  to two weeks, in days, that needs z from -2.6 to 24, where exp needs -2.6 to 3.2.) The head
  exists only in training: the served output is p, so the exported graph is the naive model's.
- ``es_dfm``: Yang et al., "Capturing Delayed Feedback in Conversion Rate Prediction via
  Elapsed-Time Sampling", AAAI 2021. A click enters the training stream once it has waited
  c = ``elapsed_hours``, labelled with what happened by then; a conversion after the wait enters
  again as a positive (the duplicate of a fake negative). The stream's label distribution q
  differs from the true p, and the loss weights each entry by p(y | x) / q(y | x):

      positives: 1 + p_dp(x)                      negatives: (1 + p_dp(x)) p_rn(x)

  with p_dp = P(delayed positive: converts after the wait | x) and p_rn = P(real negative |
  negative at the wait, x), from two heads (``dp``, ``tn``). The authors train them as a separate
  model and freeze it: here they read the child's representation detached (their losses do not
  shape the shared layers), start at their base rates (:meth:`DelayedFeedback.init_bias`), and
  their outputs enter the weights detached. Those heads need final labels: they
  learn from rows at least ``complete_after_days`` old (the authors pretrain them on an earlier
  month), dp on all such rows and tn on those negative at the wait, and their BCE losses, times
  ``aux_weight``, are added to the child's loss. Here the stream is built per row, without copies:
  a row with e >= c gives its first entry (positive iff d <= c) and, if it converted after the
  wait, the duplicate positive; the loss is the weighted sum over the entries divided by their
  number. The weights assume every fake negative's duplicate is in the data. In a steady stream
  it is, in distribution: the duplicates of the latest clicks are still to come, but those of
  earlier clicks arrive in their place. ``stream_days`` = K makes the rows such a stream: the
  entries that happened in the K days before the cut-off (a first entry when c <= e < K + c, a
  duplicate when e - d < K), so rows older than K contribute their late conversions (and train
  the heads) without entering as clicks. Without it every row's entries count: the stream of a
  log that began with its first row, short of the latest duplicates.

Every loss here is a mean over its rows in the batch (:meth:`DelayedFeedback.rows` says how
many, for combining batch means). Label weights on the funnel's tasks are refused with any
method but naive: a weighted positive moves these optima differently from the logit shift that
``predict`` undoes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import ConfigError, DelayedFeedbackConfig, TaskColumn, timing_key
from training.models.layers import Tower

DELAY_RATE = "_delay_rate"  # dfm: the delay head's raw output z, λ = exp(z) per day (B,)
TRUE_NEGATIVE = "_es_dfm_tn"  # es_dfm: logit of P(real negative | negative at the wait) (B,)
DELAYED_POSITIVE = "_es_dfm_dp"  # es_dfm: logit of P(converts after the wait) (B,)
HEADS = {"dfm": (DELAY_RATE,), "es_dfm": (TRUE_NEGATIVE, DELAYED_POSITIVE)}
RESERVED = (DELAY_RATE, TRUE_NEGATIVE, DELAYED_POSITIVE)
MAX_LOG_RATE = 20.0  # |z| bound: λ in [2e-9, 5e8] per day, finite in every term


# ---------------------------------------------------------------- the losses (pure)
def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` (B,) over the rows where ``mask`` (B,) is 1; 0 when there are none."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def bce_from_logs(log_p: Tensor, log_1mp: Tensor, label: Tensor) -> Tensor:
    """Per-row BCE from log p and log(1 - p) (B,): the form ESMM's product needs."""
    return -(label * log_p + (1.0 - label) * log_1mp)  # (B,)


def dfm_nll(
    log_p: Tensor,
    log_1mp: Tensor,
    log_rate: Tensor,
    label: Tensor,
    elapsed: Tensor,
    delay: Tensor,
) -> Tensor:
    """Per-row negative log-likelihood of DFM (B,), λ = exp(log_rate).

    y = 1: -(log p + log λ - λ d); y = 0: -log(1 - p + p exp(-λ e)), computed as
    -logaddexp(log(1 - p), log p - λ e), which stays finite for p near 0 or 1.
    """
    rate = torch.exp(log_rate)  # (B,) per day
    pos = -(log_p + log_rate - rate * delay)  # (B,) seen converting after d days
    neg = -torch.logaddexp(log_1mp, log_p - rate * elapsed)  # (B,) not (yet) converted
    return torch.where(label > 0, pos, neg)


def es_dfm_stream(
    label: Tensor,
    elapsed: Tensor,
    delay: Tensor,
    wait_days: float,
    stream_days: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The stream entries of each row (B,) as 0/1 floats: (entered, first positive, duplicate).

    A row has entered once it waited ``wait_days``; its first entry is positive if it converted
    within the wait; a conversion after the wait (seen by the cut-off) is a duplicate positive.
    With ``stream_days`` K, only the entries of the last K days count: the first entry when it
    happened then (c <= e < K + c), the duplicate when the conversion did (e - d < K).
    """
    entered = elapsed >= wait_days  # (B,)
    converted = label > 0  # (B,)
    late = converted & (delay > wait_days)  # (B,) a fake negative first
    duplicate = late & (elapsed >= wait_days)  # its conversion is seen, so it waited
    if stream_days is not None:
        entered = entered & (elapsed < stream_days + wait_days)
        duplicate = duplicate & (elapsed - delay < stream_days)
    first = entered & converted & ~late
    return entered.float(), first.float(), duplicate.float()


def es_dfm_weights(p_dp: Tensor, p_rn: Tensor) -> tuple[Tensor, Tensor]:
    """Importance weights p(y | x) / q(y | x) of the stream's positives and negatives (B,)."""
    w_pos = 1.0 + p_dp  # p(1|x) / q(1|x) = 1 + p_dp
    w_neg = (1.0 + p_dp) * p_rn  # p(0|x) / q(0|x) = (1 + p_dp) p(0|x) / (p(0|x) + p_dp)
    return w_pos, w_neg


def es_dfm_loss(
    log_p: Tensor,
    log_1mp: Tensor,
    label: Tensor,
    elapsed: Tensor,
    delay: Tensor,
    scope: Tensor,
    w_pos: Tensor,
    w_neg: Tensor,
    wait_days: float,
    stream_days: float | None = None,
) -> Tensor:
    """The importance-weighted BCE over the stream entries of the rows in ``scope`` (B,)."""
    entered, first, duplicate = es_dfm_stream(label, elapsed, delay, wait_days, stream_days)
    positive = first + duplicate  # (B,) at most one positive entry per row
    negative = entered - first  # (B,) the first entry was negative: y = 0 or a fake negative
    nll = -(positive * w_pos * log_p + negative * w_neg * log_1mp)  # (B,)
    return (nll * scope).sum() / ((entered + duplicate) * scope).sum().clamp(min=1.0)


# ---------------------------------------------------------------- the module
class DelayedFeedback(nn.Module):
    """The child's loss under one delayed-feedback method, with the heads that method trains.

    Args:
        cfg: the method and its settings.
        task: the funnel child; it must name its ``elapsed`` (and, for dfm / es_dfm, ``delay``)
            column.
        in_dim: width of the child's representation, which the heads read.
        units, dropout: the heads' MLP, as the task towers'.
    """

    def __init__(
        self,
        cfg: DelayedFeedbackConfig,
        task: TaskColumn,
        in_dim: int,
        units: list[int],
        dropout: float,
    ) -> None:
        super().__init__()
        method = cfg.method
        if method == "naive":
            raise ValueError("the naive method is the model's own loss: build() returns None")
        if task.elapsed is None:
            raise ConfigError(
                f"model.delayed_feedback.method {method!r}: the dataset task {task.name!r} "
                "names no elapsed column (tasks[].elapsed)"
            )
        if method in HEADS and task.delay is None:
            raise ConfigError(
                f"model.delayed_feedback.method {method!r}: the dataset task {task.name!r} "
                "names no delay column (tasks[].delay)"
            )
        self.method = method
        self.window = cfg.window_days or 0.0
        self.wait = cfg.elapsed_hours / 24.0  # days, as the timing columns
        self.complete_after = cfg.complete_after_days or 0.0
        self.stream = cfg.stream_days
        self.aux_weight = cfg.aux_weight
        self.elapsed_key = timing_key(task.name, "elapsed")
        self.delay_key = timing_key(task.name, "delay")
        self.heads = nn.ModuleDict(
            {name: Tower(in_dim, units, dropout) for name in HEADS.get(method, ())}
        )

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        """The child's representation (B, d) -> the training-only outputs {name: (B,)}."""
        if self.method == "es_dfm":  # the weight model: learns from h, never shapes it
            h = h.detach()
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def init_bias(self, rate: float) -> None:
        """Start the es_dfm heads at the scope's conversion rate ``rate``: most conversions
        come after a short wait, so P(delayed positive) ~ rate and P(real negative | negative at
        the wait) ~ 1 - rate. Untouched, they start at 0.5 and the first weights are off by ~2x."""
        if self.method != "es_dfm":
            return
        rate = min(max(rate, 1e-6), 1.0 - 1e-6)
        odds = math.log(rate / (1.0 - rate))
        cast(Tower, self.heads[DELAYED_POSITIVE]).out.bias.fill_(odds)
        cast(Tower, self.heads[TRUE_NEGATIVE]).out.bias.fill_(-odds)

    def loss(
        self,
        log_p: Tensor,
        log_1mp: Tensor,
        label: Tensor,
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        scope: Tensor,
    ) -> Tensor:
        """The child's loss from log p, log(1 - p), the observed label (all (B,)), the heads'
        outputs, the timing columns in ``labels`` and ``scope`` (B,): 1 on the rows it covers."""
        elapsed = labels[self.elapsed_key]  # (B,) days
        label = torch.where(scope > 0, label, 0.0)  # (B,) rows out of scope: any finite value
        if self.method == "window":
            return masked_mean(
                bce_from_logs(log_p, log_1mp, label), scope * (elapsed >= self.window)
            )
        delay = labels[self.delay_key]  # (B,) days, 0 where the label is 0
        if self.method == "dfm":
            log_rate = outputs[DELAY_RATE].clamp(-MAX_LOG_RATE, MAX_LOG_RATE)  # (B,) log λ
            return masked_mean(dfm_nll(log_p, log_1mp, log_rate, label, elapsed, delay), scope)
        p_rn = torch.sigmoid(outputs[TRUE_NEGATIVE])  # (B,)
        p_dp = torch.sigmoid(outputs[DELAYED_POSITIVE])  # (B,)
        w_pos, w_neg = es_dfm_weights(p_dp.detach(), p_rn.detach())  # the weights do not learn
        main = es_dfm_loss(
            log_p, log_1mp, label, elapsed, delay, scope, w_pos, w_neg, self.wait, self.stream
        )
        return main + self.aux_weight * self.weight_heads_loss(
            outputs, label, elapsed, delay, scope
        )

    def weight_heads_loss(
        self,
        outputs: Mapping[str, Tensor],
        label: Tensor,
        elapsed: Tensor,
        delay: Tensor,
        scope: Tensor,
    ) -> Tensor:
        """es_dfm: the tn and dp heads' BCE on the rows old enough to count as fully labelled."""
        final = scope * (elapsed >= self.complete_after)  # (B,)
        converted = label > 0  # (B,)
        dp_label = (converted & (delay > self.wait)).float()  # (B,) converts after the wait
        at_wait_negative = final * (1.0 - (converted & (delay <= self.wait)).float())  # (B,)
        dp = F.binary_cross_entropy_with_logits(
            outputs[DELAYED_POSITIVE], dp_label, reduction="none"
        )  # (B,)
        tn = F.binary_cross_entropy_with_logits(
            outputs[TRUE_NEGATIVE], (~converted).float(), reduction="none"
        )  # (B,)
        return masked_mean(dp, final) + masked_mean(tn, at_wait_negative)

    def rows(self, label: Tensor, labels: Mapping[str, Tensor], scope: Tensor) -> float:
        """How many rows (es_dfm: stream entries) the loss's main term averages over, for the
        observed label, the timing columns in ``labels`` and ``scope`` as :meth:`loss` takes."""
        elapsed = labels[self.elapsed_key]  # (B,)
        if self.method == "window":
            return float((scope * (elapsed >= self.window)).sum())
        if self.method == "dfm":
            return float(scope.sum())
        label = torch.where(scope > 0, label, 0.0)  # (B,)
        delay = labels[self.delay_key]  # (B,)
        entered, _, duplicate = es_dfm_stream(label, elapsed, delay, self.wait, self.stream)
        return float(((entered + duplicate) * scope).sum())


def build(
    cfg: DelayedFeedbackConfig, task: TaskColumn, in_dim: int, units: list[int], dropout: float
) -> DelayedFeedback | None:
    """The module of ``cfg.method`` for the funnel child ``task``; None for naive."""
    if cfg.method == "naive":
        return None
    return DelayedFeedback(cfg, task, in_dim, units, dropout)
