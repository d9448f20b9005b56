"""gpu-static suite: every Triton kernel and autotune config compiled for a GPU
target without a GPU (tessel.kernels._static), as a table of registers,
spills, shared memory, theoretical occupancy and tensor-core instructions.

The terminal table shows each kernel at one headline case per family (bf16
attention at head dim 128, bf16 linear attention at 64, the looped model at
d + 1 = 11, rank-4 compression); the JSON has every dtype and size."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from examples._common import text_table

CACHE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "triton_static.json")
HEADLINE = {"attention": "bfloat16-128", "linear_attention": "bfloat16-64", "looped": "float32-11",
            "compress": "float32-4"}
COLUMNS = ("family", "kernel", "config", "registers", "spill_bytes", "shared_kb", "occupancy_warps", "tensor_core")


def rows(targets: tuple[str, ...]) -> list[dict]:
    """The static report, compiled in a process outside the Triton interpreter (cached by source hash)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tessel.kernels._static", "--cache", CACHE]
    for target in targets:
        command += ["--target", target]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return [{"suite": "gpu-static", **r, "shared_kb": r["shared_bytes"] / 1024} for r in json.loads(done.stdout)]


def format_table(rows: list[dict]) -> str:
    """The headline case of each family, one line per kernel and config."""
    shown = [r for r in rows if HEADLINE.get(r["family"]) == r["case"]]
    cells = [[f"{r[c]:.1f}" if isinstance(r[c], float) else r[c] for c in COLUMNS] for r in shown]
    problems = [r for r in rows if r["problems"]]
    return (text_table(COLUMNS, cells)
            + f"\n{len(rows)} compiled launches, {len(problems)} with spills or too much shared memory"
            + "".join(f"\n  {r['case']} {r['kernel']} [{r['config']}]: {'; '.join(r['problems'])}"
                      for r in problems))
