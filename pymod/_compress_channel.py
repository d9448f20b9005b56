"""How the workers' signals are averaged: the collectives of a process group
(or none, for one worker), and the channels over them: the exact mean, and
LASER's noisy analog uplink under a power budget (the model is in
tessel.compress's docstring).

No channel reads a tensor on the host: finiteness goes into a device flag
(`ok`, a one-element bool tensor) that the caller reads once per step, and
noise is drawn on the signals' device from a generator keyed by (seed,
signal name, step).
"""
from __future__ import annotations

import math
import zlib

import torch

POWER_ALLOCATIONS = ("norm", "uniform")


class LocalComm:
    """One worker: collectives are the identity."""

    world_size = 1

    def sum_(self, t: torch.Tensor) -> None:
        pass

    def max_(self, t: torch.Tensor) -> None:
        pass


class ProcessGroupComm:
    """The collectives of a torch.distributed process group (None: the default group)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.world_size = dist.get_world_size(group)

    def sum_(self, t: torch.Tensor) -> None:
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)

    def max_(self, t: torch.Tensor) -> None:
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self.group)


def name_seed(seed: int, name: str, step: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + step) % (1 << 62)


def _scatter(flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
    offset = 0
    for t in targets:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class NoiselessChannel:
    """The exact mean over workers (an all-reduce)."""

    exact = True

    def average_(self, signals: list[torch.Tensor], comm, ok: torch.Tensor, names=(), step=0, factors=0) -> None:
        """Replaces each signal by its mean over workers and ands into `ok`
        whether the sum is finite. names, step: what each signal is and when
        (noise keys); the last `factors` signals are low-rank factors
        (r, length), one vector per row."""
        if not signals:
            return
        flat = torch.cat([s.reshape(-1) for s in signals])
        comm.sum_(flat)
        ok.logical_and_(torch.isfinite(flat).all())
        flat /= comm.world_size
        _scatter(flat, signals)


class NoisyChannel(NoiselessChannel):
    """LASER's analog uplink under a power budget (see tessel.compress).

    column_exponent: None splits a tensor's power over its entries as one
    signal; a number a splits it over the vectors of a factor (the rows of a
    2-D signal, i.e. P's or Q's r columns) in proportion to c_tj^a, c_tj the
    vector's largest norm over workers, each vector then getting noise of std
    c_tj / (n sqrt(p_tj)).
    """

    exact = False

    def __init__(self, power: float, power_allocation: str = "norm", seed: int = 0, column_exponent=None):
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not (power > 0 and math.isfinite(power)):
            raise ValueError(f"power must be a finite number > 0 (or None for a noiseless channel), got {power!r}")
        if power_allocation not in POWER_ALLOCATIONS:
            raise ValueError(f"power_allocation must be one of {POWER_ALLOCATIONS}, got {power_allocation!r}")
        if column_exponent is not None and not (isinstance(column_exponent, (int, float))
                                                and math.isfinite(column_exponent)):
            raise ValueError(f"column_exponent must be None or a finite number, got {column_exponent!r}")
        self.power, self.power_allocation, self.seed = float(power), power_allocation, seed
        self.column_exponent = column_exponent

    def tensor_power(self, peak_norms: torch.Tensor) -> torch.Tensor:
        """p_t: the budget split over signals by their largest norms c_t ("norm") or evenly."""
        even = torch.full_like(peak_norms, self.power / len(peak_norms))
        if self.power_allocation == "uniform":
            return even
        total = peak_norms.sum()
        return torch.where(total > 0, self.power * peak_norms / torch.where(total > 0, total, 1.0), even)

    def noise_std(self, peak_norms: torch.Tensor, workers: int, power=None) -> torch.Tensor:
        """s = c / (n sqrt(p)) for largest norms c and powers p (default: tensor_power); 0 where c = 0."""
        power = self.tensor_power(peak_norms) if power is None else power
        std = peak_norms / (workers * power.sqrt())
        return torch.where(peak_norms > 0, std, torch.zeros_like(std))

    def _shares(self, c: torch.Tensor) -> torch.Tensor:
        """How one signal's power splits over its vectors of largest norms c."""
        weights = c ** self.column_exponent
        total = weights.sum()
        return torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 1.0 / len(c))

    def average_(self, signals, comm, ok, names=(), step=0, factors=0) -> None:
        if not signals:
            return
        names = list(names) or [str(i) for i in range(len(signals))]
        by_vector = [self.column_exponent is not None and i >= len(signals) - factors for i in range(len(signals))]
        rows = [s.detach().reshape(s.shape[0] if v else 1, -1) for s, v in zip(signals, by_vector)]
        row_norms = [r.double().norm(dim=1) for r in rows]
        # Every largest norm (per signal, then per vector) in one all-reduce of maxima.
        peaks = torch.cat([torch.stack([rn.norm() for rn in row_norms]), *row_norms])
        comm.max_(peaks)
        super().average_(signals, comm, ok, names, step)
        power = self.tensor_power(peaks[:len(signals)])
        offset = len(signals)
        for s, rn, p_t, v, name in zip(signals, row_norms, power, by_vector, names):
            c = peaks[offset:offset + len(rn)]  # per vector, or the whole signal's
            offset += len(rn)
            share = self._shares(c) if v else torch.ones_like(c)
            std = self.noise_std(c, comm.world_size, p_t * share).to(s.dtype)
            # Keyed by (seed, signal, step): the same on every worker, whatever the bucketing.
            gen = torch.Generator(device=s.device).manual_seed(name_seed(self.seed, name, step))
            noise = torch.randn(len(c), s.numel() // len(c), generator=gen, dtype=s.dtype, device=s.device)
            s.add_((noise * std[:, None]).view(s.shape))
