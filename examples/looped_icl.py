"""Looped linear transformers in context: the learned preconditioner, and loops under task diversity.

One linear self-attention layer (tessel.looped_linear_attention, shared P and
Q) applied L times to in-context linear regression prompts: n examples
(x_i, x_i . w) and a query x_q, w ~ N(0, I), noiseless labels; prediction
-Z[d, n] after the loops.

A. One covariance ("Can looped transformers learn to implement multi-step
   gradient descent for in-context learning?", Gatmiry et al., 2024): x ~
   N(0, Sigma), Sigma fixed with condition number kappa = 10. The restricted
   model trains only the preconditioner A (P = e_d e_d^T, Q = -[[A, 0],
   [0, 0]]: each loop is exactly one step of GD preconditioned by A); the full
   model trains P and Q. Claims: A aligns with Sigma^-1 (cos(A, Sigma^-1)
   against cos(I, Sigma^-1)), the loss falls with L, and it beats L steps of
   plain GD at its best step size.
B. Task diversity ("On the role of depth and looping for in-context learning
   with task diversity", 2024): each prompt has its own Sigma with condition
   number uniform in [1, kappa], kappa in {2, 10, 50}. The looped model against
   L steps of GD with the best single preconditioner, fitted to convergence
   (L-BFGS on a large fixed batch) per (kappa, L); full mode adds the loops
   needed to reach a target error against kappa, out of distribution (trained
   with kappa in [1, 10], tested in [1, 20]) against an unshared model
   (shared=False), and the model trained at L run for L' in [L, 2L] loops.
"""
from __future__ import annotations

import math
import sys

import torch

import tessel
from tessel.icl import icl_prompt, least_squares_predict, preconditioned_gd_predict
from tessel.nn import LoopedLinearTransformer

from . import _common

FULL = dict(d=5, n=40, kappa_a=10.0, loops_a=[1, 2, 4, 8], steps=1000, batch=1024, kappas_b=[2.0, 10.0, 50.0],
            loops_b=[1, 2, 4, 8, 12], extras=True, target=0.05)
QUICK = dict(d=5, n=40, kappa_a=10.0, loops_a=[1, 2, 4], steps=500, batch=512, kappas_b=[50.0], loops_b=[1, 2, 4],
             extras=False, target=0.05)
EVAL_BATCH = 4096


def rotation(d, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    return q


def fixed_sigma(d, kappa, gen):
    """A covariance with eigenvalues log-spaced from 1 to kappa (mean 1), in a random basis."""
    eig = kappa ** torch.linspace(0, 1, d)
    eig = eig / eig.mean()
    rot = rotation(d, gen)
    return rot @ torch.diag(eig) @ rot.T


def sample(batch, cfg, gen, sigma=None, kappa=None, kappa_lo=1.0):
    """X (batch, n, d), y (batch, n), x_query, y_query: x ~ N(0, sigma), or each prompt
    its own covariance with condition number uniform in [kappa_lo, kappa]."""
    d, n = cfg["d"], cfg["n"]
    z = torch.randn(batch, n + 1, d, generator=gen)
    if sigma is not None:
        x = z @ torch.linalg.cholesky(sigma).T
    else:
        cond = kappa_lo + (kappa - kappa_lo) * torch.rand(batch, 1, generator=gen)
        eig = cond ** torch.rand(batch, d, generator=gen)
        eig = eig / eig.mean(1, keepdim=True)
        rot, _ = torch.linalg.qr(torch.randn(batch, d, d, generator=gen))
        x = z * eig.sqrt()[:, None, :] @ rot.mT
    w = torch.randn(batch, d, 1, generator=gen)
    y = (x @ w)[:, :, 0]
    return x[:, :n], y[:, :n], x[:, n], y[:, n]


def mse(predict, data):
    X, y, xq, yq = data
    return (predict(X, y, xq) - yq).pow(2).mean()


def fit(predict, params, draw, steps, lr):
    """Adam with clipping; a step whose loops diverge (FloatingPointError, or a non-finite
    loss) is undone and the rate halved: deep loops of a cubic update have a narrow stable region."""
    opt = torch.optim.Adam(params, lr=lr)
    good = [p.detach().clone() for p in params]
    for _ in range(steps):
        try:
            loss = mse(predict, draw())
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
def test_loss(predict, data):
    try:
        return mse(predict, data).item()
    except FloatingPointError:
        return math.inf


def restricted_predictor(d, loops, A):
    """The looped layer with P = e_d e_d^T and Q = -[[A, 0], [0, 0]]: L steps of GD preconditioned by A."""
    P = torch.zeros(d + 1, d + 1)
    P[d, d] = 1.0

    def predict(X, y, xq):
        Q = -torch.nn.functional.pad(A, (0, 1, 0, 1))
        return -tessel.looped_linear_attention(icl_prompt(X, y, xq), P, Q, loops)[:, d, -1]

    return predict


def best_step_gd(data, loops):
    """L steps of plain GD at the best step size of a grid (and that size)."""
    best = (math.inf, None)
    for eta in torch.logspace(-2, 0.5, 40).tolist():
        best = min(best, (test_loss(lambda X, y, xq: preconditioned_gd_predict(X, y, xq, loops, lr=eta), data), eta))
    return best


def fitted_pgd(data_fit, data_val, data_test, loops):
    """L steps of GD with one preconditioner fitted to convergence (L-BFGS from the best scalar step
    on data_fit); the fitted matrix or that scalar step, whichever is better on data_val (the loss is
    heavy-tailed: a preconditioner can diverge on the rare worst-conditioned prompts)."""
    _, eta = best_step_gd(data_fit, loops)
    gamma = torch.nn.Parameter(eta * torch.eye(data_fit[0].shape[-1]))
    opt = torch.optim.LBFGS([gamma], lr=1, max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def predict(X, y, xq):
        return preconditioned_gd_predict(X, y, xq, loops, preconditioner=gamma)

    def closure():
        opt.zero_grad()
        loss = mse(predict, data_fit)
        loss.backward()
        return loss

    opt.step(closure)
    fitted, fitted_val = gamma.detach().clone(), test_loss(predict, data_val)
    gamma.data = eta * torch.eye(gamma.shape[0])
    if fitted_val < test_loss(predict, data_val):
        gamma.data = fitted
    return test_loss(predict, data_test)


def cosine(a, b):
    return (a * b).sum().item() / (a.norm() * b.norm()).item()


def train_looped(cfg, loops, draw, previous=None, shared=True):
    """The full looped model (P and Q trained), its weights starting from `previous` (a curriculum over L)."""
    model = LoopedLinearTransformer(cfg["d"], loops, shared=shared, init="random", init_scale=0.02)
    if previous is not None:
        model.load_state_dict(previous.state_dict())
    fit(model, list(model.parameters()), draw, cfg["steps"], lr=1e-3 / math.sqrt(loops))
    return model


def part_a(cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    sigma = fixed_sigma(cfg["d"], cfg["kappa_a"], gen)
    inv = torch.linalg.inv(sigma)
    test = sample(EVAL_BATCH, cfg, torch.Generator().manual_seed(seed + 1), sigma=sigma)
    out = {"sigma_inv": inv.tolist(), "cos_identity": cosine(torch.eye(cfg["d"]), inv), "rows": []}
    previous, A = None, torch.nn.Parameter(0.2 * torch.eye(cfg["d"]))
    for loops in _common.progress(cfg["loops_a"], "A: one Sigma"):
        draw_gen = torch.Generator().manual_seed(seed + 10 + loops)

        def draw():
            return sample(cfg["batch"], cfg, draw_gen, sigma=sigma)

        # The restricted model: its A trained from the previous L's (a curriculum, as the full model's).
        fit(restricted_predictor(cfg["d"], loops, A), [A], draw, cfg["steps"], lr=1e-2 / math.sqrt(loops))
        previous = train_looped(cfg, loops, draw, previous)
        gd_loss, gd_eta = best_step_gd(test, loops)
        out["rows"].append({"loops": loops, "restricted": test_loss(restricted_predictor(cfg["d"], loops, A), test),
                            "full": test_loss(previous, test), "gd": gd_loss, "gd_step": gd_eta,
                            "cos_A": cosine(A.detach(), inv), "A": A.detach().tolist()})
    return out


def part_b(cfg, seed):
    out = {"rows": []}
    for kappa in _common.progress(cfg["kappas_b"], "B: task diversity"):
        test = sample(EVAL_BATCH, cfg, torch.Generator().manual_seed(seed + 2), kappa=kappa)
        fit_data = sample(4 * EVAL_BATCH, cfg, torch.Generator().manual_seed(seed + 3), kappa=kappa)
        val = sample(EVAL_BATCH, cfg, torch.Generator().manual_seed(seed + 6), kappa=kappa)
        previous = None
        for loops in cfg["loops_b"]:
            draw_gen = torch.Generator().manual_seed(seed + 100 + loops)
            previous = train_looped(cfg, loops, lambda: sample(cfg["batch"], cfg, draw_gen, kappa=kappa), previous)
            row = {"kappa": kappa, "loops": loops, "looped": test_loss(previous, test),
                   "pgd": fitted_pgd(fit_data, val, test, loops), "ols": test_loss(least_squares_predict, test)}
            if cfg["extras"] and kappa == cfg["kappas_b"][-1] and loops == 8:
                # The model trained at L, run for more loops (shared weights allow any L').
                extra = {}
                for more in (loops, loops + loops // 2, 2 * loops):
                    model = LoopedLinearTransformer(cfg["d"], more, init="random")
                    model.load_state_dict(previous.state_dict())
                    extra[more] = test_loss(model, test)
                row["more_loops"] = extra
            out["rows"].append(row)
    if cfg["extras"]:
        out["ood"] = ood(cfg, seed)
    return out


def ood(cfg, seed, loops=8):
    """Trained with kappa in [1, 10], tested in [1, 10] and in [10, 20]: shared vs unshared weights."""
    draw_gen = torch.Generator().manual_seed(seed + 500)
    inside = sample(EVAL_BATCH, cfg, torch.Generator().manual_seed(seed + 4), kappa=10.0)
    outside = sample(EVAL_BATCH, cfg, torch.Generator().manual_seed(seed + 5), kappa=20.0, kappa_lo=10.0)
    res = {}
    for shared in (True, False):
        model = None
        for L in (1, 2, 4, loops):  # a curriculum for both
            grown = LoopedLinearTransformer(cfg["d"], L, shared=shared, init="random", init_scale=0.02)
            if model is not None:
                with torch.no_grad():  # unshared: each new loop starts from the last trained one
                    for name in ("P", "Q"):
                        old = getattr(model, name)
                        getattr(grown, name).copy_(old if shared else old[torch.arange(L).clamp(max=len(old) - 1)])
            model = grown
            fit(model, list(model.parameters()), lambda: sample(cfg["batch"], cfg, draw_gen, kappa=10.0),
                cfg["steps"], lr=1e-3 / math.sqrt(L))
        res["shared" if shared else "unshared"] = {"in": test_loss(model, inside), "out": test_loss(model, outside)}
    return res


def run(args) -> dict:
    cfg = QUICK if args.quick else FULL
    torch.manual_seed(args.seed)
    with _common.Timer() as clock, _common.backend(args.backend):
        a = part_a(cfg, args.seed)
        b = part_b(cfg, args.seed)
    return {"config": cfg, "a": a, "b": b, "wall_s": clock.seconds}


def plot(results):
    plt = _common.pyplot()
    a, b = results["a"], results["b"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    loops = [r["loops"] for r in a["rows"]]
    ax = axes[0]
    for key, label in (("restricted", "restricted (A only)"), ("full", "full (P, Q)"), ("gd", "GD, best step")):
        ax.plot(loops, [r[key] for r in a["rows"]], "o-", label=label)
    ax.set(yscale="log", xlabel="loops L", ylabel="test MSE", title=f"A: one Sigma, kappa {results['config']['kappa_a']:g}")
    ax.legend(fontsize=8)
    for ax, mat, title in ((axes[1], a["rows"][-1]["A"], f"learned A (L={loops[-1]}), cos {a['rows'][-1]['cos_A']:.2f}"),
                           (axes[2], a["sigma_inv"], f"Sigma^-1 (cos with I: {a['cos_identity']:.2f})")):
        im = ax.imshow(torch.tensor(mat), cmap="coolwarm")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    ax = axes[3]
    for kappa in dict.fromkeys(r["kappa"] for r in b["rows"]):
        rows = [r for r in b["rows"] if r["kappa"] == kappa]
        ax.plot([r["loops"] for r in rows], [r["looped"] for r in rows], "o-", label=f"looped, kappa {kappa:g}")
        ax.plot([r["loops"] for r in rows], [r["pgd"] for r in rows], "s--", label=f"fitted PGD, kappa {kappa:g}")
    ax.set(yscale="log", xlabel="loops L", ylabel="test MSE", title="B: task diversity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def checks(results) -> list[dict]:
    a, b, cfg = results["a"], results["b"], results["config"]
    deep = [r for r in a["rows"] if r["loops"] >= 2]
    margin = min(r["cos_A"] for r in deep) - a["cos_identity"]
    vs_gd = max(r["restricted"] / r["gd"] for r in deep)
    restricted = [r["restricted"] for r in a["rows"]]
    full = [r["full"] for r in a["rows"]]
    hardest = [r for r in b["rows"] if r["kappa"] == max(cfg["kappas_b"]) and r["loops"] >= 4]
    vs_pgd = max(r["looped"] / r["pgd"] for r in hardest)
    out = [
        _common.check("preconditioner_aligns", margin, "min over L >= 2 of cos(A, Sigma^-1) - cos(I, Sigma^-1) > 0.1",
                      margin > 0.1),
        _common.check("beats_gd", vs_gd, "restricted / best-step GD < 0.5 at every L >= 2", vs_gd < 0.5),
        _common.check("monotone_in_loops", " > ".join(f"{x:.3g}" for x in restricted + full),
                      "restricted and full: each L below the last",
                      all(y < x for seq in (restricted, full) for x, y in zip(seq, seq[1:]))),
        _common.check("beats_pgd_diverse", vs_pgd, f"looped / fitted PGD < 0.5 at kappa {max(cfg['kappas_b']):g}, "
                      "L >= 4", vs_pgd < 0.5),
    ]
    if cfg["extras"]:
        o = b["ood"]
        out.append(_common.check("ood_shared_vs_unshared", o["shared"]["out"] / o["unshared"]["out"],
                                 "shared / unshared MSE at kappa in [10, 20] < 1",
                                 o["shared"]["out"] < o["unshared"]["out"]))
        for kappa in cfg["kappas_b"]:
            rows = [r for r in b["rows"] if r["kappa"] == kappa]
            reached = next((r["loops"] for r in rows if r["looped"] <= cfg["target"]), None)
            out.append(_common.check(f"loops_to_target_kappa_{kappa:g}", reached, f"first L with MSE <= "
                                     f"{cfg['target']} (reported)", True))
        more = next(r["more_loops"] for r in b["rows"] if "more_loops" in r)
        steps = sorted(more, key=int)
        out.append(_common.check("more_loops_than_trained", [round(more[s], 4) for s in steps],
                                 f"loss at L' = {steps} not above the trained L's", max(more.values()) <= 1.01 * more[steps[0]]))
    return out


def main(argv=None):
    return _common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
