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

import tessel
from examples._common import progress, pyplot, text_table


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
    # Peers that mark a bound of the comparison rather than an alternative (never the "best peer").
    bounds: tuple[str, ...] = ()


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
    """Makes CPU RSS track live memory: tessel's kernels give back the
    scratch they keep between calls (so a call's peak counts it), large blocks
    are mmapped (and so unmapped when freed) and free heap pages go back to
    the OS."""
    tessel.empty_cache()
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


SGEMM_N = 2048


def sgemm_call(device: str) -> Callable[[], object]:
    """A float32 matmul of two SGEMM_N x SGEMM_N matrices: the machine's matmul rate."""
    a, b = (torch.randn(SGEMM_N, SGEMM_N, device=device) for _ in range(2))
    return lambda: a @ b


def sgemm_rate(seconds: float) -> float:
    """GFLOP/s of one sgemm_call taking `seconds`."""
    return 2 * SGEMM_N**3 / seconds / 1e9


def sgemm_gflops(device: str, quick: bool) -> float:
    """This machine's float32 matmul throughput at the start of the run (each row also times its own)."""
    return sgemm_rate(time_side_by_side({"mm": sgemm_call(device)}, device, quick)["mm"])


def fma_peak_gflops(device: str) -> float | None:
    """The CPU's float32 multiply-add ceiling on the run's threads at the SIMD level in use (best of five
    short runs of independent FMA chains: a busy neighbour on the VM only lowers it), or None on GPU."""
    if device != "cpu":
        return None
    from tessel import _dispatch

    module = _dispatch.cpp_module()
    return max(module.fma_peak_gflops(torch.get_num_threads(), 20_000_000) for _ in range(5))


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
        import tessel

        cpu = tessel.cpu_info()
        info.update(cpu_level=cpu["level"], simd_bits=cpu["simd_bits"])
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


# Providers that are plain-PyTorch statements of the definition, not what a user would run instead.
REFERENCE_FORMS = ("reference", "recurrent")


def timing_columns(times: dict[str, float], bounds: tuple[str, ...] = ()) -> dict:
    """<provider>_ms for each provider, x_<provider>: its time over tessel's,
    and the best peer (the fastest provider a user would run instead, never
    one of `bounds`; the reference when there is no other) with x_best,
    tessel's speedup over it."""
    cols = {f"{name}_ms": t * 1e3 for name, t in times.items()}
    cols.update({f"x_{name}": t / times["tessel"] for name, t in times.items() if name != "tessel"})
    others = [n for n in times if n != "tessel" and n not in REFERENCE_FORMS + bounds] or \
        [n for n in times if n == "reference"]
    if others:
        best = min(others, key=times.get)
        cols.update(best_peer=best, x_best=times[best] / times["tessel"])
    return cols


# The provider name of the matmul a row's rate is compared with (timed beside it, not a peer).
MATMUL = "sgemm"


def run_cases(cases: list[Case], quick: bool) -> list[dict]:
    rows = []
    matmuls = {}  # device -> sgemm_call, made once
    for case in progress(cases, "time"):
        row = {
            "suite": case.suite, "case": case.name, "mode": case.mode,
            "dtype": str(case.dtype).removeprefix("torch."), "device": case.device, **case.info,
        }
        providers = {"tessel": case.tessel}
        if case.reference is not None:
            providers["reference"] = case.reference
        providers.update(case.peers)
        if case.flops:
            # The row's rate is given as a fraction of this matmul's, timed in the same rounds: the VMs here
            # drift by tens of percent over a run, so a rate taken at its start compared different conditions.
            if case.device not in matmuls:
                matmuls[case.device] = sgemm_call(case.device)
            providers[MATMUL] = matmuls[case.device]
        times = time_side_by_side(providers, case.device, quick)
        matmul_s = times.pop(MATMUL, None)
        row.update(timing_columns(times, case.bounds))
        row["gflops"] = case.flops / times["tessel"] / 1e9 if case.flops else None
        row["matmul_gflops"] = sgemm_rate(matmul_s) if matmul_s else None
        if case.bytes:
            row["gbps"] = case.bytes / times["tessel"] / 1e9
        row["max_err"] = case.error() if case.error is not None else None
        rows.append(row)
    return rows


def measure_memory(cases: list[Case], rows: list[dict]) -> None:
    """Adds each case's peak memory to its row (run_cases' order). On CPU
    this changes the allocator's settings for the rest of the process: call
    it after every timing."""
    for case, row in zip(progress(cases, "memory"), rows):
        row["peak_mb"] = peak_memory_mb(case.tessel, case.device)
        for name, fn in case.peers.items():
            row[f"{name}_peak_mb"] = peak_memory_mb(fn, case.device)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.2e}" if (v != 0 and abs(v) < 1e-2) else f"{v:.2f}"
    return str(v)


def _rate(row: dict, sgemm: float | None) -> str:
    """GFLOP/s (with the fraction of the sgemm rate timed beside the row, else of the run's) or GB/s, or '-'."""
    if row.get("gflops"):
        matmul = row.get("matmul_gflops") or sgemm
        return f"{row['gflops']:.1f} GF/s" + (f" ({row['gflops'] / matmul:.2f})" if matmul else "")
    if row.get("gbps"):
        return f"{row['gbps']:.1f} GB/s"
    return "-"


# The narrow table: what a reader compares at a glance (fits 120 columns).
NARROW = ("case", "mode", "tessel_ms", "best_peer", "peer_ms", "x_best", "x_reference", "rate", "peak_mb", "max_err")


def format_table(rows: list[dict], sgemm: float | None, wide: bool = False) -> str:
    """Rows as an aligned text table: the narrow columns, or with wide every
    key of the rows (what the JSON holds)."""
    if not rows:
        return "(no rows)"
    if wide:
        columns = []
        for row in rows:
            columns += [c for c in row if c not in columns and c not in ("suite", "device")]
        body = [[_cell(r.get(c)) for c in columns] for r in rows]
    else:
        columns = list(NARROW)
        body = [[_cell(r.get(c)) for c in columns[:4]] + [_cell(r.get(f"{r.get('best_peer')}_ms")),
                _cell(r.get("x_best")), _cell(r.get("x_reference")), _rate(r, sgemm),
                _cell(r.get("peak_mb")), _cell(r.get("max_err"))] for r in rows]
    return text_table(columns, body)


def write_json(path: str, env: dict, rows: list[dict], extra: dict) -> str:
    """Writes the results; {device} and {date} in path are filled in."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    path = path.format(device=slug, date=env["date"][:10])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, **extra, "rows": rows}, f, indent=1)
    return path


def write_plot(path: str, rows: list[dict], env: dict) -> None:
    """One panel per suite: tessel's speedup over the best peer per case (bars
    from 1x on a log axis: right = tessel faster) and over the reference
    (diamonds)."""
    plt = pyplot()
    if plt is None:
        print(f"matplotlib is not installed: no plot at {path}")
        return
    from matplotlib.ticker import FuncFormatter

    suites = list(dict.fromkeys(r["suite"] for r in rows))
    heights = [0.3 * sum(r["suite"] == s for r in rows) + 1.3 for s in suites]
    fig, axes = plt.subplots(len(suites), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, suite in zip(axes[:, 0], suites):
        sub = [r for r in rows if r["suite"] == suite][::-1]  # first case on top
        ys = list(range(len(sub)))
        best = [r.get("x_best") or 1.0 for r in sub]
        ax.barh(ys, [b - 1 for b in best], left=1, color=["tab:green" if b >= 1 else "tab:red" for b in best],
                alpha=0.8, label="vs best peer")
        for y, r, b in zip(ys, sub, best):
            if r.get("best_peer"):
                ax.annotate(f"{b:.2f}x {r['best_peer']}", (b, y), xytext=(4 if b >= 1 else -4, 0),
                            textcoords="offset points", va="center", ha="left" if b >= 1 else "right", fontsize=7)
        ref = [(y, r["x_reference"]) for y, r in zip(ys, sub) if r.get("x_reference")]
        if ref:
            ax.scatter([x for _, x in ref], [y for y, _ in ref], marker="D", color="black", s=16, zorder=3,
                       label="vs reference")
        values = best + [x for _, x in ref] + [1.0]
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 1.6, max(values) * 1.8)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [f"{r['case']} {r['mode']}" for r in sub], fontsize=8)
        ax.set_title(f"tessel {suite} on {env['device']} ({env['date'][:10]}): speedup, right of 1x = tessel faster",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
