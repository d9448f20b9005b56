"""The DDP hooks with real processes: gloo workers on loopback train a small
model with each hook (tests/ddp_worker.py); every run has a timeout, so a
hang fails instead of stalling the suite."""
import multiprocessing
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.elastic.utils.distributed import get_free_port

import ddp_worker

TIMEOUT_S = 240


def _start(world, target, args, tmp_path, exit_codes=None):
    ctx = multiprocessing.get_context("spawn")
    port = get_free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} of {world} workers still running after {TIMEOUT_S} s (a hang)"
    codes = [p.exitcode for p in procs]
    assert codes == (exit_codes or [0] * world), codes
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) if (tmp_path / f"rank{r}.pt").exists() else None
            for r in range(world)]


def spawn(world, kinds, tmp_path):
    return _start(world, ddp_worker.worker, (kinds, str(tmp_path)), tmp_path)


def scenario(world, name, tmp_path, *args, timeout_s=60, exit_codes=None):
    """Run ddp_worker.<name>(rank, world, *args) on `world` gloo workers; their results."""
    results = _start(world, ddp_worker.run, (name, args, str(tmp_path), timeout_s), tmp_path, exit_codes)
    for r in results:
        assert r is None or "error" not in r, r["error"]
    return results


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
    synced = ["powersgd", "powersgd_alternate", "laser", "zsgd"]
    kinds = KINDS + ["powersgd+resume", "laser+resume"] + [f"{k}+sync" for k in synced]
    results = spawn(2, kinds, tmp_path)
    _check_runs(results, KINDS)
    for base in ("powersgd", "laser"):
        for r in results:
            straight, resumed = r[base][0], r[f"{base}+resume"][0]
            # The resumed half equals the uninterrupted run's second half, bit for bit.
            assert resumed == straight[len(straight) - len(resumed):], base
            assert all(torch.equal(a, b) for a, b in zip(r[base][1], r[f"{base}+resume"][1]))
    for base in synced:
        for r in results:
            # The asynchronous hook computes what the synchronous path does, bit for bit.
            assert r[base][0] == r[f"{base}+sync"][0], base
            assert all(torch.equal(a, b) for a, b in zip(r[base][1], r[f"{base}+sync"][1])), base


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


# ---------------------------------------------------------------- the asynchronous hooks


def test_at_most_one_host_read_per_step(tmp_path):
    kinds = ["powersgd", "powersgd_alternate", "laser", "zsgd"]
    for r in scenario(2, "host_reads", tmp_path, ["allreduce"] + kinds):
        # DDP itself reads the unused-parameter map on the host: what the hooks add is on top.
        ddp_own = r["allreduce"]["reads"]
        for kind in kinds:
            assert r[kind]["steps"] == [1] * len(ddp_own), kind
            added = [a - b for a, b in zip(r[kind]["reads"], ddp_own)]
            assert max(added[2:]) <= 1, (kind, added)  # compressed (laser, zsgd: noisy) from step 2 on
        assert r["powersgd"]["buckets"] >= 4  # so a read per bucket or per collective would show


def test_collectives_keep_one_order_over_many_uneven_buckets(tmp_path):
    for kind in ("powersgd", "powersgd_alternate"):
        results = scenario(2, "bucket_order", tmp_path, kind)
        assert results[0]["buckets"] >= 4, results[0]["buckets"]
        for a, b in zip(results[0]["params"], results[1]["params"]):
            assert torch.equal(a, b), kind


def test_full_rank_hook_gives_the_exact_average_with_unused_parameters(tmp_path):
    exact = scenario(2, "averages", tmp_path, "allreduce")
    hooked = scenario(2, "averages", tmp_path, "powersgd_full")
    buckets = hooked[0]["bucket_shapes"]
    assert any(all(len(s) == 1 for s in b) for b in buckets), buckets  # a bucket of vectors only
    assert any(len(b) == 1 and len(b[0]) == 2 and b[0][0] * b[0][1] > 100_000 for b in buckets), buckets
    for rank in range(2):
        for step, (a_step, b_step) in enumerate(zip(exact[rank]["grads"], hooked[rank]["grads"])):
            for a, b in zip(a_step, b_step):
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (step, (a - b).abs().max())


def test_laser_warmup_goes_through_the_noisy_channel(tmp_path):
    power = 4.0
    noisy = scenario(2, "warmup_step", tmp_path, power)
    local = [torch.stack(ts) for ts in zip(noisy[0]["local"], noisy[1]["local"])]  # (workers, ...) per tensor
    mean = [t.mean(0) for t in local]
    peaks = torch.tensor([t.flatten(1).norm(dim=1).max().item() for t in local], dtype=torch.float64)
    # Norm allocation over the bucket's tensors: p_t = P c_t / sum c, std_t = c_t / (n sqrt(p_t)).
    std = peaks / (2 * (power * peaks / peaks.sum()).sqrt())
    noise = [(r - m) for r, m in zip(noisy[0]["received"], mean)]
    assert torch.equal(noisy[0]["received"][0], noisy[1]["received"][0])  # every worker decodes the same
    big = [i for i, t in enumerate(noise) if t.numel() >= 1000]
    for i in big:
        assert abs(noise[i].std().item() / std[i].item() - 1) < 0.1, (i, noise[i].std().item(), std[i].item())
    exact = scenario(2, "warmup_step", tmp_path, None)
    for r, m in zip(exact[0]["received"], mean):
        assert torch.allclose(r, m, atol=1e-6)


def test_a_worker_that_dies_mid_step_fails_the_others_without_a_hang(tmp_path):
    timeout_s = 20
    results = scenario(2, "dies", tmp_path, timeout_s=timeout_s, exit_codes=[0, 3])
    survivor = results[0]
    assert survivor["failed_after_s"] is not None, survivor
    assert survivor["failed_after_s"] < timeout_s + 10, survivor


def test_a_caller_may_wait_on_each_bucket_before_the_next(tmp_path):
    for r in scenario(2, "wait_each_bucket", tmp_path):
        assert r["finite"] and r["iteration"] == 4, r


def test_link_bench_kills_workers_that_stop_making_progress(tmp_path):
    """bench compress --link: a worker hung in a collective (torch's powerSGD_hook has hung past gloo's
    timeout) is killed once no provider has finished for the stall time; workers that finish are waited for."""
    from bench._link import _wait_for_workers

    out = str(tmp_path / "times.json")
    hung = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    start = time.monotonic()
    assert _wait_for_workers(hung, out, stall_s=1)
    assert time.monotonic() - start < 10 and all(p.wait(timeout=5) is not None for p in hung)
    done = [subprocess.Popen([sys.executable, "-c", f"open({out!r}, 'w').write('{{}}')"])]
    assert not _wait_for_workers(done, out, stall_s=30) and done[0].returncode == 0
