"""The shared runner: every suite hands it `Case`s; it times each provider,
measures peak memory and error, prints a table, writes JSON and a plot.

Timing: torch.utils.benchmark on CPU, triton.testing.do_bench on CUDA, with
the providers of a case taking turns (see time_side_by_side).
Peak memory: CUDA's allocator peak; on CPU the process's peak RSS during one
call (Linux VmHWM, reset before the call), above the RSS before it.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.benchmark

try:
    from tqdm import tqdm
except ImportError:  # the GPU images ship without it: no progress bar

    def tqdm(iterable, **_):
        return iterable


@dataclass
class Case:
    """One benchmark row: the same work done by tessel, its reference and peers."""

    suite: str
    name: str
    mode: str  # "fwd" or "fwd+bwd"
    dtype: torch.dtype
    device: str
    flops: float  # useful (unmasked) floating-point operations of one call
    tessel: Callable[[], object]
    reference: Callable[[], object] | None = None
    peers: dict[str, Callable[[], object]] = field(default_factory=dict)
    # Max abs difference between tessel's and the reference's outputs.
    error: Callable[[], float] | None = None
    # Bytes one call must move at least, for memory-bound cases (GB/s column).
    bytes: float | None = None
    # Extra columns for the row (e.g. bytes sent by a communication hook).
    info: dict = field(default_factory=dict)


def forward_call(fn, inputs) -> Callable[[], object]:
    """fn(*inputs) without autograd: a forward-only provider."""

    @torch.no_grad()
    def run():
        return fn(*inputs)

    return run


def forward_backward_call(fn, leaves, grad) -> Callable[[], object]:
    """fn(*leaves).backward(grad), gradients cleared first: a training-step provider."""

    def run():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(grad)

    return run


def time_call(fn: Callable[[], object], device: str, quick: bool) -> float:
    """Median seconds per call over one short measurement."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200) / 1e3
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.1 if quick else 0.2).median


def time_side_by_side(fns: dict[str, Callable[[], object]], device: str, quick: bool) -> dict[str, float]:
    """Seconds per call of each provider. Providers take turns over several
    rounds and each keeps its best round, so a slow phase of a shared machine
    does not land on one provider only."""
    for fn in fns.values():
        fn()  # warm up (lazy init, compilation, caches)
    rounds = 2 if quick else 4
    best = {name: math.inf for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], time_call(fn, device, quick))
    return best


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def _release_freed_memory() -> None:
    """Makes CPU RSS track live memory: large blocks are mmapped (and so
    unmapped when freed) and free heap pages go back to the OS."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB, fixed
    libc.malloc_trim(0)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Extra memory at the peak of one call, in MB."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        _release_freed_memory()
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        fn()
        return max(0, _status_kib("VmHWM") - base) / 1024
    except (OSError, AttributeError):
        return None


def sgemm_gflops(device: str, quick: bool) -> float:
    """This machine's float32 matmul throughput, measured in the same run."""
    n = 2048
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    return 2 * n**3 / time_side_by_side({"mm": lambda: a @ b}, device, quick)["mm"] / 1e9


def environment(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "tessel": _version("tessel"),
    }
    if device == "cpu":
        from tessel import _C

        info["simd_bits"] = 8 * _C.simd_bytes
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def timing_columns(times: dict[str, float]) -> dict:
    """<provider>_ms for each provider, then x_<provider>: its time over tessel's."""
    cols = {f"{name}_ms": t * 1e3 for name, t in times.items()}
    cols.update({f"x_{name}": t / times["tessel"] for name, t in times.items() if name != "tessel"})
    return cols


def run_cases(cases: list[Case], quick: bool) -> list[dict]:
    rows = []
    for case in tqdm(cases, desc="time", unit="case", leave=False):
        row = {
            "suite": case.suite, "case": case.name, "mode": case.mode,
            "dtype": str(case.dtype).removeprefix("torch."), "device": case.device, **case.info,
        }
        providers = {"tessel": case.tessel}
        if case.reference is not None:
            providers["reference"] = case.reference
        providers.update(case.peers)
        times = time_side_by_side(providers, case.device, quick)
        row.update(timing_columns(times))
        row["gflops"] = case.flops / times["tessel"] / 1e9
        if case.bytes:
            row["gbps"] = case.bytes / times["tessel"] / 1e9
        row["max_err"] = case.error() if case.error is not None else None
        rows.append(row)
    # Memory last: on CPU, measuring it changes the allocator's settings.
    for case, row in zip(tqdm(cases, desc="memory", unit="case", leave=False), rows):
        row["peak_mb"] = peak_memory_mb(case.tessel, case.device)
        for name, fn in case.peers.items():
            row[f"{name}_peak_mb"] = peak_memory_mb(fn, case.device)
    return rows


def format_table(rows: list[dict], sgemm: float | None) -> str:
    """Rows as an aligned text table (columns: the union of the rows' keys)."""
    if not rows:
        return "(no rows)"
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns and c not in ("suite", "device")]
    if sgemm and "gflops" in columns:
        columns.insert(columns.index("gflops") + 1, "of_sgemm")
        rows = [{**r, "of_sgemm": r["gflops"] / sgemm if r.get("gflops") else None} for r in rows]

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            return f"{v:.2e}" if (v != 0 and abs(v) < 1e-2) else f"{v:.2f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_json(path: str, env: dict, rows: list[dict], extra: dict) -> str:
    """Writes the results; {device} and {date} in path are filled in."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    path = path.format(device=slug, date=env["date"][:10])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, **extra, "rows": rows}, f, indent=1)
    return path


def write_plot(path: str, rows: list[dict], env: dict) -> None:
    """One panel per suite: tessel's speedup over each baseline, per case."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(r["suite"] for r in rows))
    fig, axes = plt.subplots(len(suites), 1, figsize=(12, 4.5 * len(suites)), squeeze=False)
    for ax, suite in zip(axes[:, 0], suites):
        sub = [r for r in rows if r["suite"] == suite]
        baselines = list(dict.fromkeys(k for r in sub for k in r if k.startswith("x_")))
        labels = [f"{r['case']}\n{r['mode']}" for r in sub]
        width = 0.8 / max(1, len(baselines))
        for i, key in enumerate(baselines):
            xs = [j + i * width for j in range(len(sub))]
            ax.bar(xs, [r.get(key) or 0 for r in sub], width, label=f"vs {key[2:]}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sub))], labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"tessel {suite} on {env['device']} ({env['date'][:10]})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
