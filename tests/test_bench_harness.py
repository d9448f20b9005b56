"""The benchmark harness's bookkeeping (its timings are never asserted: speed goals live in bench/)."""
import torch

from bench import _harness
from bench._harness import Case


def test_a_rows_matmul_rate_is_timed_beside_it(monkeypatch):
    """A row with FLOPs gets the matmul rate of its own rounds; the matmul is neither a peer nor a column of
    its own, and a row without FLOPs gets none."""
    monkeypatch.setattr(_harness, "SGEMM_N", 64)  # a short matmul: this checks bookkeeping, not speed

    def work():
        return torch.ones(64).sum()

    common = dict(suite="t", mode="fwd", dtype=torch.float32, device="cpu", tessel=work, peers={"peer": work})
    rows = _harness.run_cases([Case(name="flops", flops=1e6, **common), Case(name="none", flops=0, **common)],
                              quick=True)
    timed, untimed = rows
    assert 0 < timed["matmul_gflops"] < float("inf")
    assert untimed["matmul_gflops"] is None
    for row in rows:
        assert row["best_peer"] == "peer" and not any(_harness.MATMUL in key for key in row)
    assert "(" in _harness._rate(timed, None)  # the fraction of the row's own matmul rate is printed
