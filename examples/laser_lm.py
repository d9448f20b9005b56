"""LASER vs baselines over a noisy channel: data-parallel language modelling at several power budgets.

Spawns workers (gloo on CPU, NCCL on GPU) that train a small character-level
transformer language model (tessel attention inside) with DDP on the source
text of a few Python standard-library modules (ships with Python: no
downloads). The gradients reach the other workers through a simulated noisy
uplink (tessel.compress's channel model) at each power budget of a
log-spaced sweep, with: Z-SGD (uncompressed, tessel.distributed.zsgd_hook),
PowerSGD factors over the channel with an even power split, and LASER
(PowerSGD factors with power split by norm, tessel.distributed.laser_hook);
plus the noiseless uncompressed baseline. Reports final validation
perplexity and floats sent per step ("LASER: Linear Compression in Wireless
Distributed Optimization", Makkuva et al., ICML 2024). Expected: LASER
closest to the noiseless baseline at low power, far ahead of Z-SGD.
"""
from __future__ import annotations

import inspect
import math
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tessel import distributed as td

from . import _common
from .markov import Transformer

FULL = dict(world=4, powers=[1e1, 1e2, 1e3, 1e4, 1e5], steps=300, batch=16, seq=64, dim=64, layers=2, heads=4,
            rank=4, lr=2e-3)
QUICK = dict(world=2, powers=[1e1], steps=60, batch=16, seq=32, dim=32, layers=2, heads=2, rank=2, lr=3e-3)
METHODS = ("noiseless", "zsgd", "powersgd_channel", "laser")
CORPUS_MODULES = ("argparse", "textwrap", "difflib", "inspect", "typing")


def corpus() -> tuple[torch.Tensor, int]:
    """The modules' source as bytes (printable ASCII kept): (token ids, vocab size)."""
    import importlib

    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES)
    data = bytes(c if 32 <= c < 127 or c == 10 else 32 for c in text.encode("ascii", "replace"))
    return torch.tensor(list(data), dtype=torch.long) - 0, 128


def batch_of(data, batch, seq, gen):
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    windows = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def make_hook(method, power, cfg, model):
    if method == "noiseless":
        return None, None
    if method == "zsgd":
        return td.ZSGDState(None, power=power, model=model), td.zsgd_hook
    allocation = "uniform" if method == "powersgd_channel" else "norm"
    return td.LaserState(None, rank=cfg["rank"], power=power, power_allocation=allocation, start_iter=2,
                         model=model), td.laser_hook


def _train(rank, world, method, power, cfg, train, val, vocab, device):
    torch.manual_seed(0)
    model = Transformer(cfg["dim"], cfg["layers"], cfg["seq"], vocab=vocab, heads=cfg["heads"]).to(device)
    # One bucket for the whole model: the power budget is per step.
    ddp = DDP(model, bucket_cap_mb=1024)
    state, hook = make_hook(method, power, cfg, model)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(cfg["steps"]):
        x, y = batch_of(train, cfg["batch"], cfg["seq"], gen)
        logits = ddp(x.to(device))
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.to(device).reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the received (noisy) gradient
        opt.step()
    with torch.no_grad():
        vgen = torch.Generator().manual_seed(7)
        x, y = batch_of(val, 128, cfg["seq"], vgen)
        val_loss = F.cross_entropy(model(x.to(device)).reshape(-1, vocab), y.to(device).reshape(-1)).item()
    numel = sum(p.numel() for p in model.parameters())
    if state is None:
        floats = numel
    else:
        compressed_steps = state.compressor.iteration - getattr(state.compressor, "start_iter", 0)
        floats = state.compressor.floats_sent / max(1, compressed_steps)
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "floats_per_step": floats, "params": numel}


def _worker(rank, world, port, cfg, backend_name, device_type, out_path):
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    data, vocab = corpus()
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    results = []
    with _common.backend(backend_name):
        for method in METHODS:
            for power in ([None] if method == "noiseless" else cfg["powers"]):
                res = _train(rank, world, method, power, cfg, train, val, vocab, device)
                results.append({"method": method, "power": power, **res})
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def run(args) -> dict:
    cfg = dict(QUICK if args.quick else FULL)
    world = cfg["world"]
    if args.device == "cuda":
        world = min(world, torch.cuda.device_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with _common.Timer() as clock, tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.pt")
        mp.start_processes(_worker, args=(world, port, cfg, args.backend, args.device, path), nprocs=world,
                           start_method="spawn")
        results = torch.load(path)
    return {"config": cfg, "world": world, "results": results, "wall_s": clock.seconds}


def _series(results, method):
    rows = [r for r in results["results"] if r["method"] == method]
    return [r["power"] for r in rows], [r["perplexity"] for r in rows]


def plot(results):
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"zsgd": "Z-SGD (uncompressed)", "powersgd_channel": "PowerSGD over the channel (even split)",
              "laser": "LASER"}
    for method, label in labels.items():
        powers, ppl = _series(results, method)
        ax.plot(powers, ppl, "o-", label=label)
    base = _series(results, "noiseless")[1][0]
    ax.axhline(base, color="black", linestyle="--", label="noiseless, uncompressed")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("power budget per step")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def checks(results):
    base = _series(results, "noiseless")[1][0]
    _, laser = _series(results, "laser")
    _, zsgd = _series(results, "zsgd")
    low = 0  # the lowest power
    floats = {r["method"]: r["floats_per_step"] for r in results["results"]}
    return [
        ("LASER vs Z-SGD at the lowest power", f"ppl {laser[low]:.2f} vs {zsgd[low]:.2f} (noiseless {base:.2f})",
         laser[low] < 0.9 * zsgd[low]),
        ("noiseless baseline learns (uniform: 95)", f"ppl {base:.2f}", base < 30),
        ("floats sent per step, LASER vs uncompressed", f"{floats['laser']:.0f} vs {floats['zsgd']:.0f}",
         floats["laser"] < floats["zsgd"] / 4),
    ]


def main(argv=None):
    return _common.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
