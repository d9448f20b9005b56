"""The DDP hooks with real processes: gloo workers on loopback train a small
model with each hook (tests/ddp_worker.py); every run has a timeout, so a
hang fails instead of stalling the suite."""
import multiprocessing
import socket

import pytest
import torch

import ddp_worker

TIMEOUT_S = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, kinds, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=ddp_worker.worker, args=(r, world, port, kinds, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} of {world} workers still running after {TIMEOUT_S} s (a hang)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


KINDS = ["allreduce", "powersgd", "powersgd_alternate", "laser", "zsgd"]
# Mean loss over the last steps may exceed uncompressed DDP's by at most this much.
LOSS_SLACK = 0.15


def _check_runs(results, kinds):
    for r in results:
        assert "error" not in r, r.get("error")
    base_losses = torch.tensor([r["allreduce"][0] for r in results]).mean(0)
    for kind in kinds:
        params = [r[kind][1] for r in results]
        for other in params[1:]:
            assert all(torch.equal(a, b) for a, b in zip(params[0], other)), f"{kind}: ranks diverged"
        losses = torch.tensor([r[kind][0] for r in results]).mean(0)
        assert losses[-4:].mean() < losses[:2].mean(), f"{kind}: did not train: {losses.tolist()}"
        gap = (losses[-4:].mean() - base_losses[-4:].mean()).item()
        assert gap < LOSS_SLACK * base_losses[:2].mean().item(), f"{kind}: {losses.tolist()} vs {base_losses.tolist()}"


def test_two_workers_every_hook_and_resume(tmp_path):
    kinds = KINDS + ["powersgd+resume", "laser+resume"]
    results = spawn(2, kinds, tmp_path)
    _check_runs(results, KINDS)
    for base in ("powersgd", "laser"):
        for r in results:
            straight, resumed = r[base][0], r[f"{base}+resume"][0]
            # The resumed half equals the uninterrupted run's second half, bit for bit.
            assert resumed == straight[len(straight) - len(resumed):], base
            assert all(torch.equal(a, b) for a, b in zip(r[base][1], r[f"{base}+resume"][1]))


def test_four_workers(tmp_path):
    kinds = ["allreduce", "powersgd", "laser"]
    _check_runs(spawn(4, kinds, tmp_path), kinds[1:])


def test_ranks_that_disagree_raise_instead_of_hanging(tmp_path):
    results = spawn(2, ["mismatch"], tmp_path)
    for r in results:
        assert "ValueError: workers disagree on the gradients to compress" in r.get("error", ""), r


def test_state_arguments_follow_torch():
    from tessel.distributed import PowerSGDState

    with pytest.raises(ValueError, match="start_powerSGD_iter must be > 1"):
        PowerSGDState(None, start_powerSGD_iter=1)
    state = PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=10, min_compression_rate=2,
                          use_error_feedback=True, warm_start=True, orthogonalization_epsilon=0, random_seed=0,
                          compression_stats_logging_frequency=10_000, batch_tensors_with_same_shape=True)
    assert state.compressor.rank == 4 and state.compressor.start_iter == 10
