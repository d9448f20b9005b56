"""LASER vs Z-SGD over a noisy channel: the channel's error measured against its theory, then data-parallel language modelling at several power budgets.

Workers (gloo on CPU, NCCL on GPU; spawned here, or one per process under
`torchrun --nproc_per_node=N -m examples.laser_lm`) train a small
character-level transformer language model (tessel attention inside) with DDP
on the source of a few Python standard-library modules (no downloads). The
gradients reach the other workers through the simulated noisy uplink of
tessel.compress (worker i sends x_i scaled to its power, the server gets the
sum plus N(0, 1) noise per entry): Z-SGD sends the gradient, LASER its
rank-r factors (one per step), PowerSGD factors with an even power split
shows what the norm split earns, "LASER, noiseless" is its compression floor.
Every transmission is noisy, the uncompressed warm-up steps included.
("LASER: Linear Compression in Wireless Distributed Optimization",
Makkuva et al., ICML 2024.)

1. Mechanism, no training: one backward per worker gives fixed gradients;
   the decoded average's error E|g_hat - g_bar|^2 / |g_bar|^2 at each power,
   for Z-SGD against its closed form sum_t d_t c_t sum_u c_u / (k^2 P |g_bar|^2)
   (norm split, c_t the largest worker norm of tensor t, k workers), and for
   LASER's channel (against LASER over a noiseless channel from the same
   state, its factors first aligned with these gradients by a few noiseless
   steps), whose error should be about gamma = (entries of the model) /
   (entries sent per step) times smaller.
2. Training: final validation loss per method and power, excess over the
   noiseless run; the x-axis is Z-SGD's SNR k^2 P / d.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.elastic.utils.distributed import get_free_port
from torch.nn.parallel import DistributedDataParallel as DDP

from tessel import compress
from tessel import distributed as td

from . import _common
from .markov import Block

FULL = dict(world=4, powers=[1e1, 1e2, 1e3, 1e4], decisive=[1e1], seeds=3, steps=200, batch=16, seq=64,
            dim=64, layers=2, heads=4, rank=4, lr=2e-3, bias=True, draws=4)
QUICK = dict(world=2, powers=[1e1], decisive=[], seeds=1, steps=60, batch=16, seq=32, dim=32, layers=2, heads=2,
             rank=2, lr=3e-3, bias=True, draws=2)
NOISY = ("zsgd", "powersgd_channel", "laser")
CORPUS_MODULES = ("argparse", "textwrap", "difflib", "inspect", "typing")
WARMUP = 2  # uncompressed steps of the compressed methods, through the channel like every other step
WARM_STEPS = 6  # noiseless LASER steps on the fixed gradients before the mechanism check's step


def corpus() -> tuple[torch.Tensor, int]:
    """The modules' source as bytes (printable ASCII kept): (token ids, vocab size)."""
    import importlib

    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)
    data = bytes(c if 32 <= c < 127 or c == 10 else 32 for c in text.encode("ascii", "replace"))
    return torch.tensor(list(data), dtype=torch.long), 128


def batch_of(data, batch, seq, gen):
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    windows = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


class LM(torch.nn.Module):
    """Token + position embeddings, blocks, a linear head. bias=False leaves only
    matrices (and LayerNorm scales): more of the model compresses, gamma grows."""

    def __init__(self, cfg, vocab):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, cfg["dim"]), torch.nn.Embedding(cfg["seq"], cfg["dim"])
        self.blocks = torch.nn.Sequential(*[Block(cfg["dim"], cfg["heads"], cfg["bias"])
                                            for _ in range(cfg["layers"])])
        self.head = torch.nn.Linear(cfg["dim"], vocab, bias=cfg["bias"])

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.blocks(x))


def make_hook(method, power, cfg, model, seed):
    if method == "noiseless":
        return None, None
    if method == "zsgd":
        return td.ZSGDState(None, power=power, seed=seed, model=model), td.zsgd_hook
    allocation = "uniform" if method == "powersgd_channel" else "norm"
    return td.LaserState(None, rank=cfg["rank"], power=power, power_allocation=allocation, start_iter=WARMUP,
                         seed=seed, model=model), td.laser_hook


# ---------------------------------------------------------------- 1. the channel's error, no training


def _local_gradients(cfg, vocab, train, rank, device):
    torch.manual_seed(0)
    model = LM(cfg, vocab).to(device)
    x, y = batch_of(train, cfg["batch"], cfg["seq"], torch.Generator().manual_seed(1000 + rank))
    F.cross_entropy(model(x.to(device)).reshape(-1, vocab), y.to(device).reshape(-1)).backward()
    return [(name, p.grad.detach().clone()) for name, p in model.named_parameters()]


def _error(named, exact, norm2):
    return sum(((g - e) ** 2).sum().item() for (_, g), e in zip(named, exact)) / norm2


def mechanism(cfg, vocab, train, rank, world, device) -> dict:
    """The decoded-average error of each channel at each power (module docstring, 1.)."""
    comm = compress.ProcessGroupComm()
    grads = _local_gradients(cfg, vocab, train, rank, device)
    exact = [g.clone() for _, g in grads]
    for e in exact:
        comm.sum_(e)
        e /= world
    norm2 = sum((e ** 2).sum().item() for e in exact)
    peaks = torch.tensor([g.norm().item() for _, g in grads], dtype=torch.float64, device=device)
    comm.max_(peaks)
    sizes = torch.tensor([g.numel() for _, g in grads], dtype=torch.float64, device=device)
    d = int(sizes.sum().item())

    def copies():
        return [(name, g.clone()) for name, g in grads]

    out = {"entries": d, "powers": []}
    for power in cfg["powers"]:
        theory = (sizes * peaks).sum().item() * peaks.sum().item() / (world ** 2 * power * norm2)
        zsgd, laser, warmup, sent = [], [], [], 0
        for draw in range(cfg["draws"]):
            work = copies()
            compress.ZSGD(power, seed=draw).reduce(work, comm)
            zsgd.append(_error(work, exact, norm2))
            # LASER's channel: the same compressed step over the noisy and over a noiseless channel, from
            # a state whose factors have aligned with these gradients (WARM_STEPS noiseless steps on them),
            # as in training: a fresh random factor carries little of the gradient, and so little noise.
            warm = compress.Laser(cfg["rank"], None, seed=draw)
            for _ in range(WARM_STEPS):
                warm.reduce(copies(), comm)
            noisy, clean = copies(), copies()
            laser_noisy, laser_clean = compress.Laser(cfg["rank"], power, seed=draw), compress.Laser(cfg["rank"])
            for comp in (laser_noisy, laser_clean):
                comp.load_state_dict(warm.state_dict())
            laser_noisy.reduce(noisy, comm)
            laser_clean.reduce(clean, comm)
            laser.append(_error(noisy, [g for _, g in clean], norm2))
            sent = laser_noisy.floats_sent - warm.floats_sent
            # A warm-up step (uncompressed) of LASER: through the same channel as Z-SGD.
            work = copies()
            compress.Laser(cfg["rank"], power, start_iter=1, seed=draw).reduce(work, comm)
            warmup.append(_error(work, exact, norm2))
        out["powers"].append({"power": power, "snr": world ** 2 * power / d, "zsgd_theory": theory,
                              "zsgd": sum(zsgd) / len(zsgd), "laser_channel": sum(laser) / len(laser),
                              "laser_warmup": sum(warmup) / len(warmup), "laser_sent": sent, "gamma": d / sent})
    return out


# ---------------------------------------------------------------- 2. training


def _train(rank, method, power, seed, cfg, train, val, vocab, device):
    torch.manual_seed(seed)
    model = LM(cfg, vocab).to(device)
    # One bucket for the whole model: the power budget is per step.
    ddp = DDP(model, bucket_cap_mb=1024)
    state, hook = make_hook(method, power, cfg, model, seed)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 * (seed + 1) + rank)
    for _ in range(cfg["steps"]):
        x, y = batch_of(train, cfg["batch"], cfg["seq"], gen)
        loss = F.cross_entropy(ddp(x.to(device)).reshape(-1, vocab), y.to(device).reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the received (noisy) gradient
        opt.step()
    with torch.no_grad():
        x, y = batch_of(val, 128, cfg["seq"], torch.Generator().manual_seed(7))
        val_loss = F.cross_entropy(model(x.to(device)).reshape(-1, vocab), y.to(device).reshape(-1)).item()
    numel = sum(p.numel() for p in model.parameters())
    floats = numel if state is None else state.compressor.floats_sent / cfg["steps"]
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "floats_per_step": floats, "params": numel}


def _runs(cfg):
    """(method, power, seed, bias): the sweep, extra seeds at the decisive powers, a bias-free variant there."""
    runs = [("noiseless", None, s, cfg["bias"]) for s in range(cfg["seeds"])]
    runs += [("laser_noiseless", None, 0, cfg["bias"])]
    runs += [(m, p, 0, cfg["bias"]) for m in NOISY for p in cfg["powers"]]
    runs += [(m, p, s, cfg["bias"]) for m in NOISY for p in cfg["decisive"] for s in range(1, cfg["seeds"])]
    runs += [(m, p, 0, False) for m in ("noiseless", "zsgd", "laser") for p in
             ([None] if m == "noiseless" else cfg["decisive"])] if cfg["bias"] and cfg["decisive"] else []
    return runs


def worker(rank, world, cfg, backend_name, device, out_path, init_method="env://"):
    """One worker's whole study; rank 0 saves the results."""
    torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world)
    data, vocab = corpus()
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    results = []
    with _common.backend(backend_name):
        channel = mechanism(cfg, vocab, train, rank, world, device)
        for method, power, seed, bias in _common.progress(_runs(cfg), "laser_lm") if rank == 0 else _runs(cfg):
            method_name = method.replace("laser_noiseless", "laser")
            res = _train(rank, method_name, power, seed, {**cfg, "bias": bias}, train, val, vocab, device)
            results.append({"method": method, "power": power, "seed": seed, "bias": bias, **res})
    if rank == 0:
        torch.save({"channel": channel, "runs": results}, out_path)
    dist.destroy_process_group()


def _spawned(rank, world, port, cfg, backend_name, device_type, out_path):
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    worker(rank, world, cfg, backend_name, device, out_path, init_method=f"tcp://127.0.0.1:{port}")


def run(args) -> dict | None:
    cfg = dict(QUICK if args.quick else FULL)
    with _common.Timer() as clock, tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.pt")
        if dist.is_torchelastic_launched():  # this process is one worker; rank 0 reports
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ["LOCAL_RANK"])
            device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
            worker(rank, world, cfg, args.backend, device, path)
            if rank != 0:
                return None
        else:
            world = min(cfg["world"], torch.cuda.device_count()) if args.device == "cuda" else cfg["world"]
            mp.start_processes(_spawned, args=(world, get_free_port(), cfg, args.backend, args.device, path),
                               nprocs=world, start_method="spawn")
        results = torch.load(path, weights_only=False)
    return {"config": cfg, "world": world, **results, "wall_s": clock.seconds}


# ---------------------------------------------------------------- report


def _losses(results, method, bias=True):
    """{power: [val losses over seeds]} of one method."""
    out = {}
    for r in results["runs"]:
        if r["method"] == method and r["bias"] == bias:
            out.setdefault(r["power"], []).append(r["val_loss"])
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def plot(results):
    plt = _common.pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    channel = results["channel"]["powers"]
    snr = [c["snr"] for c in channel]
    ax0.plot(snr, [c["zsgd"] for c in channel], "o-", label="Z-SGD, measured")
    ax0.plot(snr, [c["zsgd_theory"] for c in channel], "k+--", markersize=12, label="Z-SGD, theory")
    ax0.plot(snr, [c["laser_channel"] for c in channel], "s-", label="LASER's channel, measured")
    ax0.set(xscale="log", yscale="log", xlabel="Z-SGD's SNR  k^2 P / d", ylabel="E|g_hat - g_bar|^2 / |g_bar|^2",
            title=f"decoded-average error (gamma = {channel[0]['gamma']:.0f})")
    ax0.legend(fontsize=8)
    base = _mean(_losses(results, "noiseless")[None])
    floor = _mean(_losses(results, "laser_noiseless")[None])
    d, k = results["channel"]["entries"], results["world"]
    labels = {"zsgd": "Z-SGD", "powersgd_channel": "PowerSGD, even power split", "laser": "LASER"}
    for method, label in labels.items():
        by_power = _losses(results, method)
        ax1.plot([k * k * p / d for p in by_power], [_mean(v) - base for v in by_power.values()], "o-", label=label)
    ax1.axhline(max(floor - base, 1e-4), color="gray", linestyle=":", label="LASER, noiseless (compression floor)")
    ax1.set(xscale="log", yscale="log", xlabel="Z-SGD's SNR  k^2 P / d", ylabel="excess validation loss (nats)",
            title=f"training (noiseless perplexity {math.exp(base):.1f})")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def checks(results) -> list[dict]:
    channel = results["channel"]["powers"]
    theory_ratio = max(abs(c["zsgd"] / c["zsgd_theory"] - 1) for c in channel)
    gain = min(c["zsgd"] / c["laser_channel"] for c in channel)
    gamma = channel[0]["gamma"]
    warmup = max(abs(c["laser_warmup"] / c["zsgd_theory"] - 1) for c in channel)
    base = _mean(_losses(results, "noiseless")[None])
    out = [
        _common.check("zsgd_error_matches_theory", theory_ratio, "|measured / theory - 1| <= 0.1",
                      theory_ratio <= 0.1),
        _common.check("laser_snr_gain", gain, f">= gamma / 2 = {gamma / 2:.1f}", gain >= gamma / 2),
        _common.check("fair_warmup", warmup, "warm-up error within 10% of Z-SGD's theory", warmup <= 0.1),
        _common.check("noiseless_learns", math.exp(base), "perplexity < 30 (uniform: 95)", math.exp(base) < 30),
    ]
    if not results["config"]["decisive"]:
        return out
    # Full mode: where LASER wins, and whether Z-SGD wins back at high SNR (LASER's compression floor).
    laser, zsgd = _losses(results, "laser"), _losses(results, "zsgd")
    low, high = min(laser), max(laser)
    excess = {p: (_mean(laser[p]) - base, _mean(zsgd[p]) - base) for p in (low, high)}
    out += [
        _common.check("laser_beats_zsgd_at_lowest_power", excess[low][0] / excess[low][1],
                      "LASER / Z-SGD excess loss < 0.5 (paper: 0.36-0.5)", excess[low][0] < 0.5 * excess[low][1]),
        _common.check("zsgd_beats_laser_at_highest_power", excess[high][1] / max(excess[high][0], 1e-9),
                      "Z-SGD / LASER excess loss < 1 (the crossover)", excess[high][1] < excess[high][0]),
    ]
    return out


def main(argv=None):
    return _common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
