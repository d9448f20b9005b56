"""Low-rank gradient compression: PowerSGD and LASER compressors, the Z-SGD
baseline, and the kernels under them.

A gradient of shape (n, ...) is viewed as a matrix M of shape (n, m). It is
compressed when (n + m) * rank * min_compression_rate < n * m; vectors and
small matrices travel uncompressed. With error feedback M = grad + error, and
after the step error = M - (what this worker's factors carried). Factors are
kept transposed, Pt (rank, n) and Qt (rank, m), so every vector is contiguous;
the public P, Q are their transposes and the compressed gradient is P Q^T.

PowerSGD (Vogels, Karimireddy and Jaggi, 2019), one power iteration per
step, as torch's powerSGD_hook: P = M Q, average P, orthonormalise it,
Q = M^T P, average Q, gradient = P Q^T, error = M - P Q^T (averaged factors),
Q kept as the next step's warm start: two collectives per step.
alternate=True (the reference implementation's variant, and LASER's): a step
computes one factor against the other, orthonormal one from the step before,
and sends only it; steps alternate P = M Q and Q = M^T P. One collective per
step; error = M - (this worker's factor times the other), computed before the
channel.

Channels (how the workers' signals are averaged): noiseless (an all-reduce
mean) or LASER's noisy uplink. Noisy channel: worker i scales signal x_i of
tensor t to power p_t (|x_i|^2 <= p_t) by sqrt(p_t) / c_t, c_t = max_i |x_i|
(one all-reduce of maxima); the server receives sum_i x_i * sqrt(p_t) / c_t
plus N(0, 1) noise per entry and the workers get it back noiselessly, so the
average each worker decodes is mean_i x_i + N(0, s_t^2), s_t = c_t /
(n sqrt(p_t)), n workers. The total power per step, `power`, is split over
the tensors of one call (one DDP bucket: keep a model in one bucket for a
per-step budget) in proportion to c_t ("norm") or evenly ("uniform"). The
noise of a signal is drawn from a generator keyed by (seed, the signal's name,
the step): every worker decodes the same values, and runs are reproducible
and resumable whatever the bucketing.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import _dispatch
from ._dispatch import FLOAT_DTYPES, cpp_dtype, numpy_view

POWER_ALLOCATIONS = ("norm", "uniform")
NONFINITE_ACTIONS = ("raise", "skip")


# ---------------------------------------------------------------- orthogonalize_


def orthogonalize_reference(M, eps=1e-8):
    """Modified Gram-Schmidt on the columns of M (m, r) or each (b, m, r),
    in place, column by column in plain PyTorch (as torch's PowerSGD hook)."""
    for i in range(M.shape[-1]):
        col = M[..., i:i + 1]
        norm = col.norm(dim=-2, keepdim=True) + eps
        col.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
        rest = M[..., i + 1:]
        rest.sub_((col * rest).sum(dim=-2, keepdim=True) * col)
    return M


def _check_orthogonalize(M, eps):
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if M.dim() not in (2, 3):
        raise ValueError(f"M must have shape (m, r) or (batch, m, r), got {tuple(M.shape)}")
    if M.dtype not in FLOAT_DTYPES:
        raise TypeError(f"M must be float16, bfloat16, float32 or float64, got {M.dtype}")
    if M.numel() == 0:
        raise ValueError(f"M must not be empty, got shape {tuple(M.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


@torch.library.custom_op("tessel::orthogonalize_", mutates_args=("M",))
def _orthogonalize_op(M: torch.Tensor, eps: float, backend: str) -> None:
    m, r = M.shape[-2:]
    count = M.numel() // (m * r)
    offsets = torch.from_numpy(np.arange(count, dtype=np.int64) * (m * r))
    lengths = torch.from_numpy(np.full(count, m, dtype=np.int64))
    if backend == "cpp":
        # In place on (m, r) row-major matrices: columns are vectors with element stride r.
        work = M if M.dtype == cpp_dtype(M.dtype) and M.is_contiguous() else M.to(cpp_dtype(M.dtype)).contiguous()
        _dispatch.cpp_module().orthonormalize(numpy_view(work.view(-1)), offsets.numpy(), lengths.numpy(), r, 1, r,
                                              eps, torch.get_num_threads())
        if work is not M:
            M.copy_(work)
        return
    vectors = M.reshape(-1, m, r).mT.to(_work_dtype(M.dtype, backend)).contiguous()  # (b, r, m): rows
    _ops(backend).orthonormalize(vectors.view(-1), offsets, lengths, r, eps)
    M.copy_(vectors.mT.reshape(M.shape))


@_orthogonalize_op.register_fake
def _(M, eps, backend):
    return None


def orthogonalize_(M, eps=1e-8):
    """Orthonormalise the columns of M (m, r), or of each matrix of a batch
    (b, m, r), in place by modified Gram-Schmidt; returns M. Each column is
    divided by (its norm + eps), so a zero (rank-deficient) column stays
    zero. Half-precision input is computed in float32."""
    _check_orthogonalize(M, eps)
    backend = _dispatch.resolve_backend("compress.orthogonalize_", M.device)
    if backend == "reference":
        return orthogonalize_reference(M, eps)
    _orthogonalize_op(M, float(eps), backend)
    return M


# ---------------------------------------------------------------- passes over a bucket


@dataclass
class _Item:
    """One compressed matrix: grad (n, m) contiguous work tensor (overwritten
    with the result), its error buffer, and where its factors live in the flat
    buffers."""

    grad: torch.Tensor
    error: torch.Tensor | None
    p_offset: int
    q_offset: int

    @property
    def n(self):
        return self.grad.shape[0]

    @property
    def m(self):
        return self.grad.shape[1]


class _ReferenceOps:
    """The passes in plain PyTorch, matrix by matrix: what the kernels are checked against."""

    @staticmethod
    def _factors(items, buf, rank, offset, size):
        return [buf[getattr(it, offset):getattr(it, offset) + rank * getattr(it, size)].view(rank, -1)
                for it in items]

    @staticmethod
    def _m(it):
        return it.grad if it.error is None else it.grad + it.error

    def project_p(self, items, p, q, rank):
        for it, pt, qt in zip(items, self._factors(items, p, rank, "p_offset", "n"),
                              self._factors(items, q, rank, "q_offset", "m")):
            pt.copy_(qt @ self._m(it).T)

    def project_q(self, items, p, q, rank):
        for it, pt, qt in zip(items, self._factors(items, p, rank, "p_offset", "n"),
                              self._factors(items, q, rank, "q_offset", "m")):
            qt.copy_(pt @ self._m(it))

    def reconstruct(self, items, p_out, q_out, p_err, q_err, rank):
        factors = [self._factors(items, b, rank, o, s) for b, o, s in
                   ((p_out, "p_offset", "n"), (q_out, "q_offset", "m"), (p_err, "p_offset", "n"),
                    (q_err, "q_offset", "m"))]
        for it, po, qo, pe, qe in zip(items, *factors):
            if it.error is not None:
                it.error.copy_(it.grad + it.error - pe.T @ qe)
            it.grad.copy_(po.T @ qo)

    def orthonormalize(self, buf, offsets, lengths, rank, eps):
        for off, length in zip(offsets.tolist(), lengths.tolist()):
            orthogonalize_reference(buf[off:off + rank * length].view(rank, length).T, eps)


class _CppOps:
    """tessel._C: one call per pass for the whole bucket."""

    @staticmethod
    def _table(items):
        return torch.tensor(
            [[it.grad.data_ptr(), 0 if it.error is None else it.error.data_ptr(), it.n, it.m, it.p_offset,
              it.q_offset] for it in items], dtype=torch.int64,
        ).numpy()

    def project_p(self, items, p, q, rank):
        _dispatch.cpp_module().lowrank_project(self._table(items), numpy_view(p), numpy_view(q), rank, True,
                                               torch.get_num_threads())

    def project_q(self, items, p, q, rank):
        _dispatch.cpp_module().lowrank_project(self._table(items), numpy_view(p), numpy_view(q), rank, False,
                                               torch.get_num_threads())

    def reconstruct(self, items, p_out, q_out, p_err, q_err, rank):
        _dispatch.cpp_module().lowrank_reconstruct(self._table(items), *(numpy_view(x) for x in
                                                   (p_out, q_out, p_err, q_err)), rank, torch.get_num_threads())

    def orthonormalize(self, buf, offsets, lengths, rank, eps):
        _dispatch.cpp_module().orthonormalize(numpy_view(buf), offsets.numpy(), lengths.numpy(), rank, 0, 1, eps,
                                              torch.get_num_threads())


def _ops(backend: str):
    if backend == "cpp":
        return _CppOps()
    if backend == "triton":
        return _dispatch.triton_module("lowrank").LowRankOps()
    return _ReferenceOps()


def _work_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """The dtype the passes compute in: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 and backend != "triton" else torch.float32


# ---------------------------------------------------------------- communication


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


class NoiselessChannel:
    """The exact mean over workers (an all-reduce)."""

    def average_(self, signals: list[torch.Tensor], comm, names=(), step=0, factors=0) -> bool:
        """Replaces each signal by its mean over workers; False if the sum is
        not finite. names, step: what each signal is and when (noise keys);
        the last `factors` signals are low-rank factors (r, length), one
        vector per row."""
        if not signals:
            return True
        flat = torch.cat([s.reshape(-1) for s in signals])
        comm.sum_(flat)
        if not bool(torch.isfinite(flat).all()):
            return False
        flat /= comm.world_size
        _scatter(flat, signals)
        return True


class NoisyChannel(NoiselessChannel):
    """LASER's analog uplink under a power budget (see the module docstring).

    column_exponent: None splits a tensor's power over its entries as one
    signal; a number a splits it over the vectors of a factor (the rows of a
    2-D signal, i.e. P's or Q's r columns) in proportion to c_tj^a, c_tj the
    vector's largest norm over workers, each vector then getting noise of std
    c_tj / (n sqrt(p_tj)).
    """

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
        total = peak_norms.sum()
        if self.power_allocation == "norm" and total > 0:
            return self.power * peak_norms / total
        return torch.full_like(peak_norms, self.power / len(peak_norms))

    def noise_std(self, peak_norms: torch.Tensor, workers: int, power=None) -> torch.Tensor:
        """s = c / (n sqrt(p)) for largest norms c and powers p (default: tensor_power); 0 where c = 0."""
        power = self.tensor_power(peak_norms) if power is None else power
        std = peak_norms / (workers * power.sqrt())
        return torch.where(peak_norms > 0, std, torch.zeros_like(std))

    def average_(self, signals, comm, names=(), step=0, factors=0) -> bool:
        if not signals:
            return True
        names = list(names) or [str(i) for i in range(len(signals))]
        by_vector = [self.column_exponent is not None and i >= len(signals) - factors for i in range(len(signals))]
        rows = [s.detach().reshape(s.shape[0] if v else 1, -1) for s, v in zip(signals, by_vector)]
        row_norms = [r.double().norm(dim=1) for r in rows]
        # Every largest norm (per signal, then per vector) in one all-reduce of maxima.
        peaks = torch.cat([torch.stack([rn.norm() for rn in row_norms]), *row_norms])
        comm.max_(peaks)
        if not self.average_noiseless_(signals, comm, names, step):
            return False
        power = self.tensor_power(peaks[:len(signals)])
        offset = len(signals)
        for s, rn, p_t, v, name in zip(signals, row_norms, power, by_vector, names):
            c = peaks[offset:offset + len(rn)]  # per vector, or the whole signal's
            offset += len(rn)
            share = torch.ones_like(c)
            if v:
                weights = c ** self.column_exponent
                share = weights / weights.sum() if weights.sum() > 0 else share / len(c)
            std = self.noise_std(c, comm.world_size, p_t * share)
            # Keyed by (seed, signal, step): the same on every worker, whatever the bucketing.
            gen = torch.Generator().manual_seed(_name_seed(self.seed, name, step))
            noise = torch.randn(len(c), s.numel() // len(c), generator=gen, dtype=torch.float64).to(s.device)
            s.add_((noise * std[:, None]).view(s.shape).to(s.dtype))
        return True

    average_noiseless_ = NoiselessChannel.average_


def _scatter(flat: torch.Tensor, targets: list[torch.Tensor]) -> None:
    offset = 0
    for t in targets:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# ---------------------------------------------------------------- compressors


def _name_seed(seed: int, name: str, step: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + step) % (1 << 62)


class Compressor:
    """The interface every compressor (and a user's own) offers the hooks.

    reduce(named_grads, comm) averages a list of (name, gradient) pairs over
    the workers of `comm` in place, compressing as the compressor does;
    compress(name, grad) / decompress(P, Q, shape) run one step of one tensor
    on one worker; state_dict() / load_state_dict() hold everything a resumed
    run needs.
    """

    def __init__(self, channel, on_nonfinite="raise"):
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        self.channel, self.on_nonfinite = channel, on_nonfinite
        self.iteration = 0
        self.skipped_steps = 0
        self.floats_sent = 0  # by this worker, over all steps

    def reduce(self, named_grads, comm=None, advance=True) -> bool:
        """Average the gradients over the workers in place. Returns False when
        the step was skipped (a non-finite gradient with on_nonfinite="skip":
        the gradients are zeroed and no state changes)."""
        comm = LocalComm() if comm is None else comm
        ok = self._reduce(list(named_grads), comm)
        if not ok:
            self._nonfinite(named_grads)
        if advance:
            self.iteration += 1
        return ok

    def _nonfinite(self, named_grads):
        local = [name for name, g in named_grads if not bool(torch.isfinite(g).all())]
        if self.on_nonfinite == "raise":
            where = f"in {', '.join(local)}" if local else "on another worker"
            raise FloatingPointError(
                f"non-finite gradient {where} at iteration {self.iteration}; error buffers were left unchanged "
                "(pass on_nonfinite='skip' to skip such steps)"
            )
        self.skipped_steps += 1
        for _, g in named_grads:
            g.zero_()

    def _reduce(self, named_grads, comm) -> bool:
        raise NotImplementedError

    def _send(self, signals, comm, names, step, factors=0) -> bool:
        """Average signals over the channel, counting what one worker sends."""
        self.floats_sent += sum(s.numel() for s in signals)
        return self.channel.average_(signals, comm, names, step, factors)

    def state_dict(self):
        return {"iteration": self.iteration, "skipped_steps": self.skipped_steps, "floats_sent": self.floats_sent}

    def load_state_dict(self, state):
        self.iteration, self.skipped_steps = state["iteration"], state["skipped_steps"]
        self.floats_sent = state["floats_sent"]


class ZSGD(Compressor):
    """Z-SGD: the uncompressed gradient over the noisy channel at the same
    power (the baseline LASER is measured against); power=None is plain
    all-reduce averaging."""

    def __init__(self, power, power_allocation="norm", seed=0, on_nonfinite="raise"):
        channel = NoiselessChannel() if power is None else NoisyChannel(power, power_allocation, seed)
        super().__init__(channel, on_nonfinite)

    def _reduce(self, named_grads, comm):
        return self._send([g for _, g in named_grads], comm, [nm for nm, _ in named_grads], self.iteration)

    def compress(self, name, grad):
        return grad, None

    @staticmethod
    def decompress(P, Q=None, shape=None):
        return P if shape is None else P.reshape(shape)


class _TensorState:
    """Per compressed tensor: its error buffer, warm factors and step count."""

    __slots__ = ("error", "p", "q", "steps", "phase")

    def __init__(self):
        self.error = self.p = self.q = None
        self.steps = 0
        self.phase = 0  # alternate: 0 sends P next (needs q), 1 sends Q (needs p)


class PowerSGD(Compressor):
    """PowerSGD: rank-`rank` compression with error feedback (see the module
    docstring for the step). start_iter: steps that average uncompressed
    first (error feedback then starts from a good point). alternate: one
    factor per step (one collective). seed: the warm-start Q of every tensor
    is drawn from it, identically on every worker. on_nonfinite: "raise"
    (FloatingPointError naming the parameter) or "skip" (zero gradients, no
    state change) when a gradient is not finite."""

    def __init__(self, rank=4, error_feedback=True, warm_start=True, min_compression_rate=2.0, start_iter=0,
                 orthogonalization_epsilon=0.0, alternate=False, seed=0, on_nonfinite="raise", channel=None):
        super().__init__(NoiselessChannel() if channel is None else channel, on_nonfinite)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not (isinstance(min_compression_rate, (int, float)) and min_compression_rate >= 0):
            raise ValueError(f"min_compression_rate must be a number >= 0, got {min_compression_rate!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        if alternate and not warm_start:
            raise ValueError("alternate=True needs warm_start=True (each step multiplies by the previous factor)")
        self.rank, self.error_feedback, self.warm_start = rank, error_feedback, warm_start
        self.min_compression_rate, self.start_iter = float(min_compression_rate), start_iter
        self.eps, self.alternate, self.seed = float(orthogonalization_epsilon), alternate, seed
        self._tensors: dict[str, _TensorState] = {}
        self._verified: set[tuple] = set()
        self._recording, self._last_factors = False, {}

    # -- which tensors, which rank

    def compressible(self, grad: torch.Tensor) -> bool:
        if grad.dim() < 2:
            return False
        n, m = grad.shape[0], grad.numel() // grad.shape[0]
        return (n + m) * self._rank_of(n, m) * self.min_compression_rate < n * m

    def _rank_of(self, n, m):
        return min(self.rank, n, m)

    def _state(self, name, n, m, device, dtype) -> _TensorState:
        st = self._tensors.get(name)
        if st is None:
            st = self._tensors[name] = _TensorState()
        r = self._rank_of(n, m)
        if st.q is None or st.q.shape != (r, m):
            gen = torch.Generator().manual_seed(_name_seed(self.seed, name))
            st.q = torch.randn(r, m, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            st.p, st.steps, st.phase = None, 0, 0
            if self.alternate:
                orthogonalize_(st.q.T, self.eps)
        if self.error_feedback and (st.error is None or st.error.shape != (n, m)):
            st.error = torch.zeros(n, m, device=device, dtype=dtype)
        return st

    def _verify_once(self, named_grads, mats, comm):
        """Workers must agree on what they compress (else the collectives
        would mismatch and hang): compared once per list of names."""
        key = tuple(nm for nm, _ in named_grads)
        if key in self._verified:
            return
        ns = [g.shape[0] for _, g in mats]
        ms = [g.numel() // g.shape[0] for _, g in mats]
        sig = torch.tensor([len(named_grads), sum(g.numel() for _, g in named_grads), len(mats), sum(ns), sum(ms),
                            sum(self._rank_of(n, m) for n, m in zip(ns, ms)), self.rank], dtype=torch.float64,
                           device=mats[0][1].device)  # NCCL reduces device tensors only
        hi, lo = sig.clone(), -sig
        comm.max_(hi)
        comm.max_(lo)
        if not torch.equal(hi, -lo):
            raise ValueError(
                "workers disagree on the gradients to compress (count, sizes, matrix shapes or rank): this worker "
                f"has {len(named_grads)} tensors of {int(sig[1])} elements, {len(mats)} compressed at rank "
                f"{self.rank}; the largest/smallest over workers are {hi.tolist()} / {(-lo).tolist()}"
            )
        self._verified.add(key)

    # -- one step

    def _reduce(self, named_grads, comm):
        compress = self.iteration >= self.start_iter
        plain = [(nm, g) for nm, g in named_grads if not (compress and self.compressible(g))]
        mats = [(nm, g) for nm, g in named_grads if compress and self.compressible(g)]
        if not mats:
            return self._send([g for _, g in plain], comm, [nm for nm, _ in plain], self.iteration)
        self._verify_once(named_grads, mats, comm)
        backend = _dispatch.resolve_backend("compress", mats[0][1].device)
        work_dtype = _work_dtype(mats[0][1].dtype, backend)
        # Tensors grouped by rank (below min(n, m) only with min_compression_rate < 2): one pass each.
        groups: dict[int, list] = {}
        for nm, g in mats:
            n, m = g.shape[0], g.numel() // g.shape[0]
            st = self._state(nm, n, m, g.device, work_dtype)
            groups.setdefault(self._rank_of(n, m), []).append((nm, g, st))
        first = True
        for rank, members in sorted(groups.items()):
            # A P step serves every tensor (each keeps an orthonormal q); a Q step needs every p.
            phase = min(st.phase for _, _, st in members) if self.alternate else 0
            if not self._step(members, phase, rank, plain if first else [], comm, backend, work_dtype):
                return False
            first = False
        return True

    def _step(self, members, phase, rank, plain, comm, backend, work_dtype) -> bool:
        ops = _ops(backend)
        items, works, p_off, q_off = [], [], 0, 0
        for nm, g, st in members:
            n, m = st.error.shape if st.error is not None else (g.shape[0], g.numel() // g.shape[0])
            work = g.reshape(n, m)
            if work.dtype != work_dtype or not work.is_contiguous() or work.data_ptr() != g.data_ptr():
                work = work.to(work_dtype).contiguous()
            works.append(work)
            items.append(_Item(work, st.error, p_off, q_off))
            p_off, q_off = p_off + rank * n, q_off + rank * m
        device = works[0].device
        P = torch.empty(p_off, device=device, dtype=work_dtype)
        Q = torch.empty(q_off, device=device, dtype=work_dtype)
        P_parts = [P[it.p_offset:it.p_offset + rank * it.n].view(rank, it.n) for it in items]
        Q_parts = [Q[it.q_offset:it.q_offset + rank * it.m].view(rank, it.m) for it in items]
        plain_signals = [g for _, g in plain]
        plain_names = [nm for nm, _ in plain]
        names = [nm for nm, _, _ in members]

        if not self.alternate:
            for (nm, g, st), q in zip(members, Q_parts):
                q.copy_(self._fresh_q(nm, st).view_as(q) if not self.warm_start else st.q)
            ops.project_p(items, P, Q, rank)
            if not self._send(plain_signals + P_parts, comm, plain_names + [f"{n}:P" for n in names],
                              self.iteration, len(P_parts)):
                return False
            self._orthonormalize(ops, P, items, "p", rank)
            ops.project_q(items, P, Q, rank)
            if not self._send(Q_parts, comm, [f"{n}:Q" for n in names], self.iteration, len(Q_parts)):
                return False
            ops.reconstruct(items, P, Q, P, Q, rank)
            self._record(members, P_parts, Q_parts, rank)
            for (nm, g, st), q in zip(members, Q_parts):
                st.q = q.view(rank, -1).clone()
        else:
            # phase 0 sends P = M Q (Q orthonormal from the step before); phase 1 sends Q = M^T P.
            sent, fixed_parts, sent_parts = (P, Q_parts, P_parts) if phase == 0 else (Q, P_parts, Q_parts)
            for (nm, g, st), part in zip(members, fixed_parts):
                part.copy_(st.q if phase == 0 else st.p)
            (ops.project_p if phase == 0 else ops.project_q)(items, P, Q, rank)
            local = sent.clone()
            sent_names = [f"{n}:{'PQ'[phase]}" for n in names]
            if not self._send(plain_signals + sent_parts, comm, plain_names + sent_names, self.iteration,
                              len(sent_parts)):
                return False
            if phase == 0:
                ops.reconstruct(items, P, Q, local, Q, rank)
            else:
                ops.reconstruct(items, P, Q, P, local, rank)
            self._record(members, P_parts, Q_parts, rank)
            self._orthonormalize(ops, sent, items, "p" if phase == 0 else "q", rank)
            for (nm, g, st), part in zip(members, sent_parts):
                if phase == 0:
                    st.p = part.view(rank, -1).clone()
                else:
                    st.q = part.view(rank, -1).clone()
        for (nm, g, st), work in zip(members, works):
            st.steps += 1
            st.phase = 1 - phase
            if work.data_ptr() != g.data_ptr():
                g.copy_(work.view_as(g))
        return True

    def _record(self, members, P_parts, Q_parts, rank):
        """The factors whose product this step's gradients are, for compress()."""
        if self._recording:
            self._last_factors = {nm: (p.view(rank, -1).clone(), q.view(rank, -1).clone())
                                  for (nm, _, _), p, q in zip(members, P_parts, Q_parts)}

    def _fresh_q(self, name, st):
        gen = torch.Generator().manual_seed(_name_seed(self.seed, name, st.steps + 1))
        return torch.randn(st.q.numel(), generator=gen, dtype=torch.float64).to(st.q)

    def _orthonormalize(self, ops, buf, items, which, rank):
        offsets = torch.tensor([it.p_offset if which == "p" else it.q_offset for it in items], dtype=torch.int64)
        lengths = torch.tensor([it.n if which == "p" else it.m for it in items], dtype=torch.int64)
        ops.orthonormalize(buf, offsets, lengths, rank, self.eps)

    # -- one tensor on one worker

    def compress(self, name, grad):
        """One step for one tensor on this worker: (P (n, r), Q (m, r)) with
        P Q^T the compressed gradient, or (grad, None) for a tensor that is
        sent uncompressed. Error buffer and warm start are updated."""
        work = grad.detach().clone()
        self._recording, self._last_factors = True, {}
        try:
            if not self._reduce([(name, work)], LocalComm()):
                self._nonfinite([(name, grad)])
        finally:
            self._recording = False
        if name not in self._last_factors:
            return work, None
        pt, qt = self._last_factors.pop(name)
        return pt.T, qt.T

    @staticmethod
    def decompress(P, Q=None, shape=None):
        """P Q^T (or P itself when Q is None), reshaped to `shape` if given."""
        out = P if Q is None else P @ Q.mT
        return out if shape is None else out.reshape(shape)

    # -- checkpoints

    def state_dict(self):
        state = super().state_dict()
        state["tensors"] = {nm: {"error": st.error, "p": st.p, "q": st.q, "steps": st.steps, "phase": st.phase}
                            for nm, st in self._tensors.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._tensors = {}
        for nm, s in state["tensors"].items():
            st = self._tensors[nm] = _TensorState()
            st.error = None if s["error"] is None else s["error"].clone()
            st.p = None if s["p"] is None else s["p"].clone()
            st.q = None if s["q"] is None else s["q"].clone()
            st.steps, st.phase = s["steps"], s["phase"]


class Laser(PowerSGD):
    """LASER (Makkuva et al., ICML 2024): alternating PowerSGD factors with
    error feedback sent over the noisy channel (module docstring) under a
    total power budget `power` per step, split over the tensors sent by
    `power_allocation` and, with column_exponent, over each factor's
    vectors (NoisyChannel); power=None is the noiseless limit (alternating
    PowerSGD). Uncompressed tensors share the channel and the budget."""

    def __init__(self, rank=4, power=None, power_allocation="norm", column_exponent=None, min_compression_rate=2.0,
                 start_iter=0, orthogonalization_epsilon=0.0, seed=0, on_nonfinite="raise"):
        channel = NoiselessChannel() if power is None else NoisyChannel(power, power_allocation, seed,
                                                                         column_exponent)
        super().__init__(rank, error_feedback=True, warm_start=True, min_compression_rate=min_compression_rate,
                         start_iter=start_iter, orthogonalization_epsilon=orthogonalization_epsilon, alternate=True,
                         seed=seed, on_nonfinite=on_nonfinite, channel=channel)
