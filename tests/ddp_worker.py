"""What each spawned worker of tests/test_distributed.py runs: a small model
trained with DDP on gloo, one communication hook per scenario, results saved
for the parent to compare."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tessel import distributed as td

STEPS = 12


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, 4))


def batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 32, generator=gen)
    return x, torch.sin(x[:, :4] * 2) + 0.1 * x[:, 4:8]


def make_state(kind, model, rank):
    if kind == "allreduce":
        return None, None
    if kind == "powersgd":
        return td.PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2, model=model), \
            td.powersgd_hook
    if kind == "powersgd_alternate":
        return td.PowerSGDState(None, 2, start_powerSGD_iter=2, alternate=True, model=model), td.powersgd_hook
    if kind == "laser":
        return td.LaserState(None, rank=2, power=1e4, model=model), td.laser_hook
    if kind == "zsgd":
        return td.ZSGDState(None, power=1e4, model=model), td.zsgd_hook
    if kind == "mismatch":  # ranks disagree on the rank
        return td.PowerSGDState(None, 2 + 2 * rank, start_powerSGD_iter=2, model=model), td.powersgd_hook
    raise ValueError(kind)


def train(kind, rank, steps, start=None):
    """Losses of `steps` steps; `start` = (model, optimizer, hook) states to resume from."""
    model = make_model()
    ddp = DDP(model)
    state, hook = make_state(kind, model, rank)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        state.load_state_dict(start["hook"])
        first = start["step"]
    losses = []
    for step in range(first, first + steps):
        x, y = batch(rank, step)
        loss = F.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "hook": None if state is None else state.state_dict(), "step": first + steps}
    return losses, [p.detach().clone() for p in model.parameters()], checkpoint


def worker(rank, world, port, kinds, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for kind in kinds:
            if kind.endswith("+resume"):
                base = kind[: -len("+resume")]
                _, _, checkpoint = train(base, rank, STEPS // 2)
                # Through bytes, as a checkpoint file would.
                path = os.path.join(out_dir, f"ckpt{rank}.pt")
                torch.save(checkpoint, path)
                losses, params, _ = train(base, rank, STEPS - STEPS // 2, torch.load(path, weights_only=False))
                results[kind] = (losses, params)
            else:
                losses, params, _ = train(kind, rank, STEPS)
                results[kind] = (losses, params)
    except Exception as err:  # reported to the parent, which asserts on it
        results["error"] = f"{type(err).__name__}: {err}"
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
