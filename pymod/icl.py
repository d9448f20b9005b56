"""In-context linear regression, the task of the looped transformer studies:
the prompt matrix the looped model reads, and the baselines it is compared
with (preconditioned gradient descent, least squares)."""
from __future__ import annotations

import torch

from ._dispatch import check_same, check_tensor


def icl_prompt(X, y, x_query):
    """Z = [[x_1 .. x_n, x_q], [y_1 .. y_n, 0]]: (batch, d+1, n+1) from
    X (batch, n, d), y (batch, n), x_query (batch, d)."""
    check_tensor("X", X, 3, "(batch, n, d)")
    check_tensor("y", y, 2, "(batch, n)")
    check_tensor("x_query", x_query, 2, "(batch, d)")
    check_same(("X", "y", "x_query"), (X, y, x_query))
    b, n, d = X.shape
    if y.shape != (b, n) or x_query.shape != (b, d):
        raise ValueError(
            f"y must have shape {(b, n)} and x_query {(b, d)} for X of shape {(b, n, d)}, "
            f"got {tuple(y.shape)} and {tuple(x_query.shape)}"
        )
    top = torch.cat([X.mT, x_query[:, :, None]], dim=2)
    bottom = torch.cat([y, torch.zeros_like(y[:, :1])], dim=1)[:, None, :]
    return torch.cat([top, bottom], dim=1)


def preconditioned_gd_predict(X, y, x_query, steps, preconditioner=None, lr=1.0):
    """Prediction x_q^T w after `steps` steps of preconditioned gradient
    descent on the in-context least squares loss (1/2n) |X w - y|^2 from
    w = 0: w <- w - lr * Gamma (1/n) X^T (X w - y). Batched; Gamma is (d, d)
    or one per prompt (batch, d, d), the identity when None."""
    n, d = X.shape[1], X.shape[2]
    gamma = torch.eye(d, dtype=X.dtype, device=X.device) if preconditioner is None else preconditioner
    w = torch.zeros(X.shape[0], d, 1, dtype=X.dtype, device=X.device)
    for _ in range(steps):
        grad = X.mT @ (X @ w - y[:, :, None]) / n
        w = w - lr * (gamma @ grad)
    return (x_query * w[:, :, 0]).sum(-1)


def least_squares_predict(X, y, x_query, ridge=0.0):
    """Prediction x_q^T w of (ridge) least squares on each prompt, batched."""
    d = X.shape[2]
    gram = X.mT @ X + ridge * torch.eye(d, dtype=X.dtype, device=X.device)
    w = torch.linalg.lstsq(gram, X.mT @ y[:, :, None]).solution[:, :, 0]
    return (x_query * w).sum(-1)
