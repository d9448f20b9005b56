"""What the studies share: the command line, the backend switch, and the
JSON + PNG + verdict table each study writes."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

import tessel


def parse_args(study: str, doc: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m examples.{study}", description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run in seconds (what CI runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--backend", choices=("tessel", "reference"), default="tessel",
                        help="tessel's kernels, or the plain PyTorch references (same seed, same steps)")
    parser.add_argument("--out", default=os.path.join("examples", "out", study), help="directory for JSON and PNG")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


@contextlib.contextmanager
def backend(name: str):
    """tessel's kernels ("tessel": the automatic choice) or its references."""
    with tessel.using_backend("auto" if name == "tessel" else "reference"):
        yield


def check(name: str, value, threshold: str, passed: bool) -> dict:
    """One claim a study tests: its measured value, the threshold it is held to, the verdict."""
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(passed)}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(header, rows) -> str:
    """The header and rows (sequences of cells) as left-aligned text columns."""
    lines = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def verdict_table(checks: list[dict]) -> str:
    """The checks as aligned text: name, value, threshold, verdict."""
    header = ("check", "value", "threshold", "verdict")
    return text_table(header, [(c["name"], _fmt(c["value"]), c["threshold"], "ok" if c["passed"] else "MISSED")
                               for c in checks])


def finish(study: str, args, metrics: dict, figure, checks: list[dict]) -> dict:
    """Writes <out>/<study>.json (with its "checks") and .png, prints the verdict table."""
    os.makedirs(args.out, exist_ok=True)
    metrics = {"study": study, "quick": args.quick, "device": args.device, "backend": args.backend,
               "seed": args.seed, "torch": torch.__version__, "checks": checks, **metrics}
    with open(os.path.join(args.out, f"{study}.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    if figure is not None:
        figure.savefig(os.path.join(args.out, f"{study}.png"), dpi=110)
    print(verdict_table(checks))
    plotted = " and .png" if figure is not None else " (no plot: matplotlib is not installed)"
    print(f"wrote {args.out}/{study}.json{plotted} ({metrics['wall_s']:.1f} s)")
    return metrics


def main(study, argv=None) -> dict | None:
    """The command line of a study module (run, plot, checks): parse, run, write, judge.
    A study launched by torchrun writes from rank 0 only (its run returns None elsewhere)."""
    # Under `python -m` the module is __main__; its spec keeps the real name.
    name = getattr(study.__spec__, "name", study.__name__).rsplit(".", 1)[-1]
    args = parse_args(name, study.__doc__, argv)
    results = study.run(args)
    if results is None:
        return None
    figure = study.plot(results) if pyplot() is not None else None
    return finish(name, args, results, figure, study.checks(results))


def progress(items, desc):
    """A progress bar over items (tqdm when installed; the GPU images may lack it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


def pyplot():
    """matplotlib.pyplot drawing to files (Agg), or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
