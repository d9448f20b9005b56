"""Looped linear transformers learn multi-step preconditioned gradient descent in context.

Trains tessel.nn.LoopedLinearTransformer (one linear self-attention layer,
shared P and Q, applied L times; each L starts from the weights trained for
the previous one, a curriculum over loops) on in-context linear regression: prompts of
n examples (x_i, x_i . w) plus a query x_q, with x ~ N(0, Sigma), Sigma's
condition number drawn uniformly in [1, kappa] per prompt and w ~ N(0, I).
For each L it compares the model's test loss with L steps of preconditioned
gradient descent whose preconditioner (step included) is fitted on the same
data, and with ordinary least squares ("Can looped transformers learn to
implement multi-step gradient descent for in-context learning?"; "On the
role of depth and looping for in-context learning with task diversity").
Expected: the looped model tracks multi-step preconditioned GD and its loss
falls with L.
"""
from __future__ import annotations

import math
import sys

import torch

from tessel.linear_attention import least_squares_predict, preconditioned_gd_predict
from tessel.nn import LoopedLinearTransformer

from . import _common

FULL = dict(d=10, n=20, kappa=5.0, loops=[1, 2, 3, 4, 6, 8, 10, 12], steps=500, batch=1024, noise=0.0, lr=3e-3)
QUICK = dict(d=5, n=10, kappa=3.0, loops=[1, 2, 4], steps=300, batch=512, noise=0.0, lr=1e-2)
EVAL_BATCH = 4096


def sample(batch, d, n, kappa, noise, gen, device):
    """X (batch, n, d), y (batch, n), x_query (batch, d), y_query (batch,)."""
    cond = 1 + (kappa - 1) * torch.rand(batch, 1, generator=gen)
    eig = cond ** torch.rand(batch, d, generator=gen)
    eig = eig / eig.mean(1, keepdim=True)
    rot, _ = torch.linalg.qr(torch.randn(batch, d, d, generator=gen))
    x = torch.randn(batch, n + 1, d, generator=gen) * eig.sqrt()[:, None, :] @ rot.mT
    w = torch.randn(batch, d, 1, generator=gen)
    y = (x @ w)[:, :, 0] + noise * torch.randn(batch, n + 1, generator=gen)
    x, y = x.to(device), y.to(device)
    return x[:, :n], y[:, :n], x[:, n], y[:, n]


def train(predict, params, cfg, gen, device, lr):
    """Adam with gradient clipping. A step that makes the loops diverge
    (FloatingPointError, or a non-finite loss) is undone and the rate halved:
    deep loops of a cubic update have a narrow stable region."""
    opt = torch.optim.Adam(params, lr=lr)
    good = [p.detach().clone() for p in params]  # the last weights whose forward was finite
    for _ in range(cfg["steps"]):
        X, y, xq, yq = sample(cfg["batch"], cfg["d"], cfg["n"], cfg["kappa"], cfg["noise"], gen, device)
        try:
            loss = (predict(X, y, xq) - yq).pow(2).mean()
            diverged = not torch.isfinite(loss)
        except FloatingPointError:
            diverged = True
        if diverged:
            with torch.no_grad():
                for p, g in zip(params, good):
                    p.copy_(g)
            for group in opt.param_groups:
                group["lr"] /= 2
            opt.state.clear()
            continue
        good = [p.detach().clone() for p in params]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


@torch.no_grad()
def test_loss(predict, test):
    X, y, xq, yq = test
    return (predict(X, y, xq) - yq).pow(2).mean().item()


def run(args) -> dict:
    cfg = QUICK if args.quick else FULL
    device = args.device
    torch.manual_seed(args.seed)
    test = sample(EVAL_BATCH, cfg["d"], cfg["n"], cfg["kappa"], cfg["noise"],
                  torch.Generator().manual_seed(args.seed + 1), device)
    ols = test_loss(least_squares_predict, test)
    results = {"loops": [], "looped": [], "pgd": [], "ols": ols}
    with _common.Timer() as clock, _common.backend(args.backend):
        previous = None
        for loops in _common.progress(cfg["loops"], "loops"):
            gen = torch.Generator().manual_seed(args.seed + 100 + loops)
            model = LoopedLinearTransformer(cfg["d"], loops, init="random", init_scale=0.02, device=device)
            if previous is not None:
                # A curriculum over loops (as the papers train): the shared (P, Q) of L - 1 loops starts L.
                model.load_state_dict(previous.state_dict())
            train(model, list(model.parameters()), cfg, gen, device, lr=cfg["lr"] / math.sqrt(loops))
            previous = model
            # GD with a learned preconditioner (its scale is the step size), from a safe step; d x d
            # numbers are cheap to fit, so twice the steps.
            gamma = torch.nn.Parameter(torch.eye(cfg["d"], device=device) * 0.2)
            pgd = lambda X, y, xq, g=gamma, L=loops: preconditioned_gd_predict(X, y, xq, L, preconditioner=g)
            train(pgd, [gamma], dict(cfg, steps=2 * cfg["steps"]), torch.Generator().manual_seed(args.seed + loops),
                  device, lr=1e-2)
            results["loops"].append(loops)
            results["looped"].append(test_loss(model, test))
            results["pgd"].append(test_loss(pgd, test))
    results["wall_s"] = clock.seconds
    return results


def plot(results):
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(results["loops"], results["looped"], "o-", label="looped linear transformer (trained)")
    ax.plot(results["loops"], results["pgd"], "s--", label="preconditioned GD, L steps (fitted)")
    ax.set_yscale("log")
    if results["ols"] > 1e-3 * min(results["looped"] + results["pgd"]):
        ax.axhline(results["ols"], color="gray", linestyle=":", label="least squares")
    else:  # noiseless prompts with n >= d: least squares is exact
        ax.plot([], [], color="gray", linestyle=":", label=f"least squares: {results['ols']:.1e}")
    ax.set_xlabel("loops L")
    ax.set_ylabel("test loss (MSE)")
    ax.legend()
    fig.tight_layout()
    return fig


def checks(results) -> list[dict]:
    looped, pgd = results["looped"], results["pgd"]
    ratio = max(a / b for a, b in zip(looped, pgd))
    return [
        _common.check("monotone_in_loops", " > ".join(f"{x:.3g}" for x in looped), "each L below the last",
                      all(b < a for a, b in zip(looped, looped[1:]))),
        _common.check("looped_vs_fitted_gd_worst", ratio, "< 1.5", ratio < 1.5),
        _common.check("deepest_vs_one_loop", looped[-1] / looped[0], "< 0.8", looped[-1] < 0.8 * looped[0]),
    ]


def main(argv=None):
    return _common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
