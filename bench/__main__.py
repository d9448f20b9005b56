"""python -m bench attention|linear_attention|looped|compress|science|gpu-static|all [--device cpu|cuda|auto] [--quick] [--case REGEX] [--json PATH] [--plot PATH] [--wide] [--link 1gbit] [--target sm_90]

Runs each suite's cases side by side (tessel, reference, peers), prints a
table, and writes JSON (device, versions, date, rows) and a plot. In --json,
{device} and {date} are filled in, e.g. bench/results/{device}-attention.json.
"""
from __future__ import annotations

import argparse
import importlib
import re

import torch
import torch.distributed

from . import _harness

SUITES = ("attention", "linear_attention", "looped", "compress")
# Earlier names still accepted (DESIGN.md and committed results use them).
ALIASES = {"linear": "linear_attention"}
# Not in "all": the studies train models (minutes), they are not kernel benchmarks; gpu-static
# compiles the Triton kernels for GPU targets (minutes without its cache).
EXTRA_SUITES = ("science", "gpu-static")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=SUITES + EXTRA_SUITES + tuple(ALIASES) + ("all",))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="a few small cases, short timing")
    parser.add_argument("--case", metavar="REGEX", help="only the cases whose name matches (re.search)")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the speedups")
    parser.add_argument("--wide", action="store_true", help="print every column (the JSON has them all)")
    parser.add_argument("--link", choices=("100mbit", "1gbit", "10gbit"),
                        help="compress: train 2 workers over a link of this bandwidth (network namespaces, root)")
    parser.add_argument("--target", choices=("sm_80", "sm_90", "sm_100"), action="append",
                        help="gpu-static: the GPU target(s) to compile for (default: all three)")
    args = parser.parse_args(argv)
    args.suite = ALIASES.get(args.suite, args.suite)
    if args.link and args.suite != "compress":
        parser.error("--link goes with the compress suite")

    if args.suite == "gpu-static":
        from . import gpu_static

        targets = args.target or ["sm_80", "sm_90", "sm_100"]
        rows = gpu_static.rows(tuple(targets))
        print(gpu_static.format_table(rows))
        if args.json:
            env = _harness.environment("cpu")
            print(f"wrote {_harness.write_json(args.json, env, rows, {'targets': targets})}")
        return
    if args.suite == "compress" and torch.distributed.is_torchelastic_launched() and not args.link:
        # Launched by torchrun: every process is one worker of the hook rows; rank 0 prints them.
        from . import compress

        rows = compress.torchrun_rows(args.quick)
        if rows is not None:
            print(_harness.format_table(rows, None, args.wide))
        return
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    suites = SUITES if args.suite == "all" else (args.suite,)

    env = _harness.environment(device)
    sgemm = _harness.sgemm_gflops(device, args.quick)
    peak = _harness.fma_peak_gflops(device)
    print(f"tessel bench on {env['device']} ({env['threads']} threads), torch {env['torch']}, "
          f"{'quick' if args.quick else 'full'}; float32 matmul: {sgemm:.1f} GFLOP/s"
          + (f"; FMA peak: {peak:.1f} GFLOP/s" if peak else ""))
    timed = []  # (suite, its cases, their rows, the rows it measures its own way)
    for suite in suites:
        module = importlib.import_module(f"bench.{suite}")
        cases, extra = [], []
        if args.link:  # only the training steps over the link: they take minutes
            suite_rows = importlib.import_module("bench._link").rows(args.link, args.quick)
        else:
            cases = [c for c in module.cases(device, dtype, args.quick) if re.search(args.case or "", c.name)]
            suite_rows = _harness.run_cases(cases, args.quick)
        if hasattr(module, "extra_rows") and not (args.link or args.case):
            extra = module.extra_rows(device, dtype, args.quick)
        timed.append((suite, cases, suite_rows, extra))
    rows = []
    for suite, cases, suite_rows, extra in timed:  # memory after every timing: it changes the CPU allocator
        _harness.measure_memory(cases, suite_rows)
        print(f"\n== {suite} ==")
        print(_harness.format_table(suite_rows + extra, sgemm, args.wide))
        rows += suite_rows + extra
    meta = {"sgemm_gflops": sgemm, "fma_peak_gflops": peak, "quick": args.quick}
    if device == "cuda" and not args.link:  # the measured rates beside what the compiler says of the kernels
        from tessel.kernels._static import device_target

        from . import gpu_static

        try:
            target = device_target()
        except ValueError as unknown:  # the timings above still get written
            print(f"\nno gpu-static table: {unknown}")
        else:
            meta["gpu_static"] = gpu_static.rows((target,))
            print(f"\n== gpu-static ({target}: this device's target) ==")
            print(gpu_static.format_table(meta["gpu_static"]))
    if args.json:
        path = _harness.write_json(args.json, env, rows, meta)
        print(f"\nwrote {path}")
    if args.plot:
        _harness.write_plot(args.plot, rows, env)


if __name__ == "__main__":
    main()
