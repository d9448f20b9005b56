"""Science suite: the three studies (examples/) in quick mode, each run with
tessel's kernels and with the plain PyTorch references (same seed, same
steps); the row is the wall time of each (best of two turns) and their ratio."""
from __future__ import annotations

import tempfile

import torch

from examples import laser_lm, looped_icl, markov

STUDIES = {"markov": markov, "looped_icl": looped_icl, "laser_lm": laser_lm}


def cases(device: str, dtype: torch.dtype, quick: bool):
    return []


def extra_rows(device: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    rows = []
    for name, study in STUDIES.items():
        # Backends take turns over two rounds, each keeping its best: the first run of a
        # process pays one-time costs (imports, thread pools, first calls) that are not the study's.
        times = {"tessel": float("inf"), "reference": float("inf")}
        for _ in range(2):
            for backend in times:
                with tempfile.TemporaryDirectory() as out:
                    argv = ["--device", device, "--backend", backend, "--out", out] + (["--quick"] if quick else [])
                    times[backend] = min(times[backend], study.main(argv)["wall_s"])
        rows.append({"suite": "science", "case": name, "mode": "quick" if quick else "full", "dtype": "float32",
                     "device": device, "tessel_ms": 1e3 * times["tessel"], "reference_ms": 1e3 * times["reference"],
                     "x_reference": times["reference"] / times["tessel"]})
    return rows
