"""How per-task losses become one backward pass: the loss-weighting strategies.

Each strategy is an ``nn.Module`` (so learned weights live in ``parameters()`` for the optimiser and
in ``state_dict()`` for the checkpoint) with one method, ``backward(losses, model)``, which runs the
backward pass and returns the weight it gave each task (the trainer logs them). Selected by
``WeightingConfig.type``:

- ``static``: sum_k loss_weight_k * L_k, the weights from ``TrainConfig.tasks``.
- ``uncertainty``: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
  for Scene Geometry and Semantics", CVPR 2018. Each task learns s_k = log sigma_k^2 and the total
  is sum_k c_k exp(-s_k) L_k + s_k / 2 with c_k = 1/2 for regression (Gaussian likelihood:
  L/(2 sigma^2) + log sigma) and c_k = 1 for binary tasks (the paper's classification form
  L/sigma^2 + log sigma, from a Boltzmann likelihood with temperature sigma^2). The log sigma term
  is the same s/2 in both, which stops the weights from collapsing to zero.
- ``mgda``: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
  The weights are the min-norm point of the convex hull of the per-task gradients with respect to
  the shared parameters, found with Frank-Wolfe on their Gram matrix (closed form for two
  tasks). A common descent direction for all tasks, hence a Pareto-stationary point at the end.
  We use the exact parameter gradients (their "MGDA") rather than the representation-gradient
  upper bound (MGDA-UB): it costs one extra backward per task through the shared part only.
- ``pe_ltr``: Lin et al., "A Pareto-Efficient Algorithm for Multiple Objective Optimization in
  E-Commerce Recommendation", RecSys 2019. The same min-norm problem with a lower bound c_k on each
  weight: the equality-constrained relaxation is solved in closed form, then projected onto
  {w >= c, sum w = 1} so a product-critical task never loses its say.

For MGDA and PE-LTR the chosen weights scale the whole loss (towers included), as in the
reference implementations. Under DistributedDataParallel they are computed from each rank's
local gradients; the averaged gradient DDP applies is still identical on every rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from training.config import ConfigError, TrainConfig
from training.models.base import MultiTaskModel


class Weighting(nn.Module, ABC):
    """Base: knows the task names and kinds (binary / regression), in loss order."""

    def __init__(self, task_kinds: Mapping[str, str]) -> None:
        super().__init__()
        self.task_names = list(task_kinds)
        self.task_kinds = dict(task_kinds)

    @abstractmethod
    def backward(
        self, losses: Mapping[str, Tensor], model: MultiTaskModel, extra: Tensor | None = None
    ) -> dict[str, float]:
        """Run the backward pass of the weighted total plus ``extra`` (a penalty outside the
        task weighting, e.g. the embedding regulariser); return the weight given each task."""


def _plus(total: Tensor, extra: Tensor | None) -> Tensor:
    return total if extra is None else total + extra


def _dense(grad: Tensor | None, param: Tensor) -> Tensor:
    """A parameter's gradient as a dense tensor (zeros when unused; sparse embedding tables)."""
    if grad is None:
        return torch.zeros_like(param)
    return grad.to_dense() if grad.is_sparse else grad


class StaticWeighting(Weighting):
    def __init__(self, task_kinds: Mapping[str, str], weights: Mapping[str, float]) -> None:
        super().__init__(task_kinds)
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.task_names}

    def backward(
        self, losses: Mapping[str, Tensor], model: MultiTaskModel, extra: Tensor | None = None
    ) -> dict[str, float]:
        total = torch.stack([self.weights[n] * losses[n] for n in self.task_names]).sum()
        torch.autograd.backward(_plus(total, extra))
        return dict(self.weights)


def uncertainty_total(
    losses: Sequence[Tensor], log_vars: Tensor, regression: Sequence[bool]
) -> tuple[Tensor, Tensor]:
    """Kendall et al.'s total sum_k c_k exp(-s_k) L_k + s_k / 2 and the weights c_k exp(-s_k).

    ``log_vars`` is (T,) s_k = log sigma_k^2; c_k = 1/2 where ``regression[k]`` else 1.
    """
    L = torch.stack(list(losses))  # (T,)
    c = torch.tensor([0.5 if r else 1.0 for r in regression], dtype=L.dtype, device=L.device)
    w = c * torch.exp(-log_vars)  # (T,)
    return (w * L + 0.5 * log_vars).sum(), w


class UncertaintyWeighting(Weighting):
    """Learned homoscedastic uncertainty; ``log_vars`` (T,) start at 0 (sigma = 1)."""

    def __init__(self, task_kinds: Mapping[str, str]) -> None:
        super().__init__(task_kinds)
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names)))  # (T,)
        self.regression = [self.task_kinds[n] == "regression" for n in self.task_names]

    def backward(
        self, losses: Mapping[str, Tensor], model: MultiTaskModel, extra: Tensor | None = None
    ) -> dict[str, float]:
        total, w = uncertainty_total(
            [losses[n] for n in self.task_names], self.log_vars, self.regression
        )
        torch.autograd.backward(_plus(total, extra))
        return {n: float(v) for n, v in zip(self.task_names, w.detach().tolist(), strict=True)}


# ---------------------------------------------------------------- min-norm solvers (pure numpy)
def _line_min(aa: float, ab: float, bb: float) -> float:
    """argmin over g in [0, 1] of |g a + (1 - g) b|^2 given a.a, a.b, b.b (closed form)."""
    denom = aa + bb - 2.0 * ab
    if denom <= 1e-20:  # a == b: every point of the segment is the same
        return 0.5
    return float(np.clip((bb - ab) / denom, 0.0, 1.0))


def min_norm_weights(gram: np.ndarray, iters: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Weights on the simplex minimising |sum_k w_k g_k|^2, from the Gram matrix M = G G^T.

    Two tasks: the closed form. More: Frank-Wolfe with away steps (Lacoste-Julien & Jaggi, 2015)
    and exact line search, since the objective w^T M w is quadratic. Plain Frank-Wolfe (the
    paper's solver) converges only as O(1/k) when the optimum lies on a face of the simplex,
    which is the usual case; away steps make it linear.
    """
    M = np.asarray(gram, dtype=np.float64)  # (T, T)
    T = M.shape[0]
    if T == 1:
        return np.ones(1)
    if T == 2:
        g = _line_min(M[0, 0], M[0, 1], M[1, 1])
        return np.array([g, 1.0 - g])
    w = np.full(T, 1.0 / T)
    for _ in range(iters):
        grad = M @ w  # (T,) half the gradient of w^T M w
        obj = float(w @ grad)
        s = int(np.argmin(grad))
        active = np.flatnonzero(w > 0)
        a = int(active[np.argmax(grad[active])])
        gap_fw, gap_away = obj - grad[s], grad[a] - obj
        if gap_fw < tol:
            break
        if gap_fw >= gap_away:  # towards the best vertex
            d = -w.copy()
            d[s] += 1.0
            step_max = 1.0
        else:  # away from the worst vertex in use
            d = w.copy()
            d[a] -= 1.0
            step_max = w[a] / (1.0 - w[a]) if w[a] < 1.0 else 1e12
        curv = float(d @ M @ d)
        step = step_max if curv <= 1e-20 else min(max(-float(grad @ d) / curv, 0.0), step_max)
        w = np.maximum(w + step * d, 0.0)
        w /= w.sum()
    return w


def project_simplex(v: np.ndarray, total: float = 1.0) -> np.ndarray:
    """Euclidean projection of ``v`` onto {x >= 0, sum x = total} (sort-based, exact)."""
    v = np.asarray(v, dtype=np.float64)
    if total <= 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - total
    ks = np.arange(1, len(v) + 1)
    rho = int(np.nonzero(u - css / ks > 0)[0][-1])
    theta = css[rho] / (rho + 1)
    out: np.ndarray = np.maximum(v - theta, 0.0)
    return out


def pe_ltr_weights(gram: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """PE-LTR's weights: min |sum w g|^2 with sum w = 1 and w >= ``lower``.

    Writing w = c + u, the relaxation (sum u = 1 - sum c, no sign constraint) is a linear KKT
    system [M 1; 1^T 0][u; lambda] = [-M c; 1 - sum c], solved by least squares (the Gram matrix
    may be singular); u is then projected onto the non-negative simplex of that total.
    """
    M = np.asarray(gram, dtype=np.float64)  # (T, T)
    c = np.asarray(lower, dtype=np.float64)  # (T,)
    T = M.shape[0]
    rest = 1.0 - float(c.sum())
    if rest < -1e-12:
        raise ConfigError(f"weighting.lower_bounds sum to {c.sum():.3f} > 1")
    K = np.zeros((T + 1, T + 1))
    K[:T, :T], K[:T, T], K[T, :T] = M, 1.0, 1.0
    rhs = np.concatenate([-M @ c, [rest]])
    u = np.linalg.lstsq(K, rhs, rcond=None)[0][:T]
    w: np.ndarray = c + project_simplex(u, max(rest, 0.0))
    return w


class _GradientWeighting(Weighting):
    """Shared machinery of MGDA and PE-LTR: per-task gradients on the shared parameters."""

    def backward(
        self, losses: Mapping[str, Tensor], model: MultiTaskModel, extra: Tensor | None = None
    ) -> dict[str, float]:
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        if not shared:
            raise ConfigError(
                f"weighting {type(self).__name__} needs shared parameters; this model has none"
            )
        rows = []
        for n in self.task_names:
            grads = torch.autograd.grad(losses[n], shared, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat([_dense(g, p).reshape(-1) for g, p in zip(grads, shared, strict=True)])
            )  # (P,)
        G = torch.stack(rows).double()  # (T, P)
        w = self.solve((G @ G.T).cpu().numpy())  # (T,)
        total = torch.stack(
            [float(wk) * losses[n] for wk, n in zip(w, self.task_names, strict=True)]
        ).sum()
        torch.autograd.backward(_plus(total, extra))
        return {n: float(wk) for n, wk in zip(self.task_names, w, strict=True)}

    @abstractmethod
    def solve(self, gram: np.ndarray) -> np.ndarray:
        """Task weights from the (T, T) Gram matrix of the task gradients."""


class MGDAWeighting(_GradientWeighting):
    def solve(self, gram: np.ndarray) -> np.ndarray:
        return min_norm_weights(gram)


class PELTRWeighting(_GradientWeighting):
    def __init__(self, task_kinds: Mapping[str, str], lower_bounds: Mapping[str, float]) -> None:
        super().__init__(task_kinds)
        unknown = sorted(set(lower_bounds) - set(self.task_names))
        if unknown:
            raise ConfigError(f"weighting.lower_bounds: unknown tasks {unknown}")
        self.lower = np.array([float(lower_bounds.get(n, 0.0)) for n in self.task_names])
        if (self.lower < 0).any() or self.lower.sum() > 1.0:
            raise ConfigError("weighting.lower_bounds must be >= 0 and sum to at most 1")

    def solve(self, gram: np.ndarray) -> np.ndarray:
        return pe_ltr_weights(gram, self.lower)


def build_weighting(cfg: TrainConfig, task_kinds: Mapping[str, str]) -> Weighting:
    """The strategy ``cfg.weighting.type`` for the tasks (names -> kinds) in loss order."""
    kind = cfg.weighting.type
    if kind == "static":
        return StaticWeighting(task_kinds, {n: cfg.weights(n).loss_weight for n in task_kinds})
    if kind == "uncertainty":
        return UncertaintyWeighting(task_kinds)
    if kind == "mgda":
        return MGDAWeighting(task_kinds)
    return PELTRWeighting(task_kinds, cfg.weighting.lower_bounds)
