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
the step) on the signal's device: every worker decodes the same values, and
runs are reproducible and resumable whatever the bucketing. Over a noisy
channel every transmission is noisy: the uncompressed warm-up steps
(start_iter) go through the same channel, under the same budget, as Z-SGD's.

A step: reduce_bucket() for each part (a DDP bucket), then end_step(), which
reads the step's finiteness flags from the device once (the only host read of
a step) and raises or skips; reduce() does both for one list. A part whose
average is not finite leaves its error buffers and warm starts as they were
(the kernels read the device flag themselves); on_nonfinite="skip" then zeroes
every gradient of the step, "raise" raises FloatingPointError naming the
tensors. Rank-deficient gradients are safe: Gram-Schmidt reorthogonalises,
so a rank-r compressor reconstructs any gradient of rank <= r.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _dispatch
from ._compress_channel import (POWER_ALLOCATIONS, LocalComm, NoiselessChannel, NoisyChannel,  # noqa: F401
                                ProcessGroupComm, name_seed)
from ._compress_passes import Group, ops, orthogonalize_reference, work_dtype
from ._dispatch import FLOAT_DTYPES, is_number
from ._ops import acc_dtype, kernel_op, numpy_view

NONFINITE_ACTIONS = ("raise", "skip")


def _check_eps(name, eps):
    if not is_number(eps) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")


# ---------------------------------------------------------------- orthogonalize_


def _check_orthogonalize(M, eps):
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if M.dim() not in (2, 3):
        raise ValueError(f"M must have shape (m, r) or (batch, m, r), got {tuple(M.shape)}")
    if M.dtype not in FLOAT_DTYPES:
        raise TypeError(f"M must be float16, bfloat16, float32 or float64, got {M.dtype}")
    if M.numel() == 0:
        raise ValueError(f"M must not be empty, got shape {tuple(M.shape)}")
    _check_eps("eps", eps)


def _orthogonalize_cpp(M, eps):
    m, r = M.shape[-2:]
    count = M.numel() // (m * r)
    # In place on (m, r) row-major matrices: columns are vectors with element stride r.
    work = M if M.dtype == acc_dtype(M.dtype) and M.is_contiguous() else M.to(acc_dtype(M.dtype)).contiguous()
    _dispatch.cpp_module().orthonormalize(numpy_view(work.view(-1)), np.arange(count, dtype=np.int64) * (m * r),
                                          np.full(count, m, dtype=np.int64), r, 1, r, eps, torch.get_num_threads())
    if work is not M:
        M.copy_(work)


@kernel_op("compress", "orthogonalize_", cpp=_orthogonalize_cpp, triton="orthogonalize_", mutates_args=("M",))
def _orthogonalize_op(M: torch.Tensor, eps: float, backend: str) -> None:
    return None


def orthogonalize_(M, eps=1e-8):
    """Orthonormalise the columns of M (m, r), or of each matrix of a batch
    (b, m, r), in place by Gram-Schmidt with reorthogonalisation; returns M.
    Each column is divided by (its norm + eps), the norm computed without
    overflow or underflow, so a zero (rank-deficient) column stays zero.
    Half-precision input is computed in float32."""
    _check_orthogonalize(M, eps)
    backend = _dispatch.resolve_backend("compress.orthogonalize_", M.device)
    if backend == "reference":
        return orthogonalize_reference(M, eps)
    _orthogonalize_op(M, float(eps), backend)
    return M


# ---------------------------------------------------------------- compressors


def _check_named_grad(name, grad) -> None:
    if not isinstance(name, str):
        raise TypeError(f"a gradient's name must be a str (it keys the compression state), got "
                        f"{type(name).__name__} {name!r}")
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"gradient {name!r} must be a torch.Tensor, got {type(grad).__name__}")
    if grad.dtype not in FLOAT_DTYPES:
        raise TypeError(f"gradient {name!r} must be float16, bfloat16, float32 or float64, got {grad.dtype}")


def _columns(grad: torch.Tensor) -> int:
    """m of the (shape[0], m) matrix view: the product of the other dims."""
    return math.prod(grad.shape[1:])


class Compressor:
    """The interface every compressor (and a user's own) offers the hooks.

    A step is reduce_bucket(named_grads, comm) for each of its parts (averages
    a list of (name, gradient) pairs over the workers of `comm` in place,
    compressing as the compressor does) and then end_step(); reduce() is
    both for one list. plain_step() says whether this step is an exact,
    uncompressed average (the hook then runs one plain all-reduce and calls
    end_step). compress(name, grad) / decompress(P, Q, shape) run one step of
    one tensor on one worker; state_dict() / load_state_dict() hold
    everything a resumed run needs.
    """

    start_iter = 0

    def __init__(self, channel, on_nonfinite="raise"):
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        self.channel, self.on_nonfinite = channel, on_nonfinite
        self.iteration = 0
        self.skipped_steps = 0
        self.floats_sent = 0  # by this worker, over all steps
        self._parts = []  # this step's sends: (device flag, state snapshot)
        self._step_grads = []  # this step's (name, gradient) pairs

    # -- one step

    def plain_step(self) -> bool:
        return self.channel.exact and self.iteration < self.start_iter

    def reduce_bucket(self, named_grads, comm=None) -> None:
        """Average one part of this step's gradients over the workers in place
        (no host synchronisation: the verdict on finiteness waits for end_step)."""
        named_grads = list(named_grads)
        for nm, g in named_grads:
            _check_named_grad(nm, g)
        names = [nm for nm, _ in named_grads]
        if len(set(names)) != len(names):
            dup = sorted({nm for nm in names if names.count(nm) > 1})
            raise ValueError(f"duplicate name(s) {dup} among the gradients of one step part: names key the state")
        self._step_grads.extend(named_grads)
        if named_grads:
            self._reduce(named_grads, LocalComm() if comm is None else comm)

    def end_step(self) -> bool:
        """Close the step: one host read of its finiteness flags. Returns False
        when the step was skipped (on_nonfinite="skip": every gradient of the
        step zeroed); raises FloatingPointError with on_nonfinite="raise"."""
        parts, grads = self._parts, self._step_grads
        self._parts, self._step_grads = [], []
        ok = not parts or bool(torch.cat([flag for flag, _ in parts]).all())
        if not ok:
            self._nonfinite(parts, grads)
        self.iteration += 1
        return ok

    def reduce(self, named_grads, comm=None, advance=True) -> bool:
        """reduce_bucket, then end_step unless advance=False (more parts of
        this step follow). Returns False when the step was skipped."""
        try:
            self.reduce_bucket(named_grads, comm)
        except BaseException:
            self.abandon_step()
            raise
        return self.end_step() if advance else True

    def abandon_step(self) -> None:
        """Forget the step under way after an error (not a non-finite value),
        so the next step starts clean; the step does not count."""
        self._parts, self._step_grads = [], []

    def _part(self, names, device) -> torch.Tensor:
        """A device flag for one send, and what to restore if it ends false."""
        flag = torch.ones(1, dtype=torch.bool, device=device)
        self._parts.append((flag, self._snapshot(names)))
        return flag

    def _snapshot(self, names):
        return None

    def _restore(self, snapshot) -> None:
        pass

    def _nonfinite(self, parts, named_grads):
        for flag, snapshot in parts:
            if not bool(flag):
                self._restore(snapshot)
        bad = [nm for nm, g in named_grads if not bool(torch.isfinite(g).all())]
        if self.on_nonfinite == "raise":
            where = f"in {', '.join(bad)}" if bad else "on another worker"
            raise FloatingPointError(
                f"non-finite gradient {where} at iteration {self.iteration} (tensors sent uncompressed show the "
                "average over workers); error buffers were left unchanged (pass on_nonfinite='skip' to skip such "
                "steps)"
            )
        self.skipped_steps += 1
        for _, g in named_grads:
            g.zero_()

    def _reduce(self, named_grads, comm) -> None:
        raise NotImplementedError

    def _send(self, signals, comm, ok, names, factors=0) -> None:
        """Average signals over the channel, counting what one worker sends."""
        self.floats_sent += sum(s.numel() for s in signals)
        self.channel.average_(signals, comm, ok, names, self.iteration, factors)

    def _send_plain(self, named_grads, comm) -> None:
        if named_grads:
            ok = self._part([nm for nm, _ in named_grads], named_grads[0][1].device)
            self._send([g for _, g in named_grads], comm, ok, [nm for nm, _ in named_grads])

    # -- checkpoints

    def state_dict(self):
        return {"iteration": self.iteration, "skipped_steps": self.skipped_steps, "floats_sent": self.floats_sent}

    def load_state_dict(self, state):
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        for key in ("iteration", "skipped_steps", "floats_sent"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
        self.iteration, self.skipped_steps = state["iteration"], state["skipped_steps"]
        self.floats_sent = state["floats_sent"]


class ZSGD(Compressor):
    """Z-SGD: the uncompressed gradient over the noisy channel at the same
    power (the baseline LASER is measured against); power=None is plain
    all-reduce averaging."""

    def __init__(self, power, power_allocation="norm", seed=0, on_nonfinite="raise"):
        channel = NoiselessChannel() if power is None else NoisyChannel(power, power_allocation, seed)
        super().__init__(channel, on_nonfinite)

    def plain_step(self) -> bool:
        return self.channel.exact

    def _reduce(self, named_grads, comm):
        self._send_plain(named_grads, comm)

    def compress(self, name, grad):
        """One step of one tensor (advances the step): (its average, None)."""
        _check_named_grad(name, grad)
        work = grad.detach().clone()
        self.reduce([(name, work)])
        return work, None

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

    def fields(self):
        return (self.error, self.p, self.q, self.steps, self.phase)


def _as_work(t, device, dtype):
    """A state tensor on the working device and dtype, contiguous (a copy only when needed)."""
    if t is None or (t.device == device and t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(device=device, dtype=dtype).contiguous()


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
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)) or not (
                min_compression_rate >= 0 and math.isfinite(min_compression_rate)):
            raise ValueError(f"min_compression_rate must be a finite number >= 0, got {min_compression_rate!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be an int >= 0, got {start_iter!r}")
        _check_eps("orthogonalization_epsilon", orthogonalization_epsilon)
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
        n, m = grad.shape[0], _columns(grad)
        return n * m > 0 and (n + m) * self._rank_of(n, m) * self.min_compression_rate < n * m

    def _rank_of(self, n, m):
        return min(self.rank, n, m)

    def _state(self, name, n, m, device, dtype, passes) -> _TensorState:
        """The tensor's state, checked against its gradient and moved to the working device and dtype; a fresh
        one's Q is orthonormalised by the step's passes."""
        st = self._tensors.get(name)
        r = self._rank_of(n, m)
        if st is None:
            st = self._tensors[name] = _TensorState()
        for field, t, shape in (("error", st.error, (n, m)), ("q", st.q, (r, m)), ("p", st.p, (r, n))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(
                    f"compression state of {name!r}: {field} has shape {tuple(t.shape)}, but its ({n}, {m}) "
                    f"gradient at rank {r} needs {shape} (a state from another model or rank?)"
                )
        if st.q is None:
            gen = torch.Generator().manual_seed(name_seed(self.seed, name))
            st.q = torch.randn(r, m, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            st.p, st.steps, st.phase = None, 0, 0
            if self.alternate:
                passes.orthonormalize(st.q.view(-1), [0], [m], r, self.eps)
        st.error, st.p, st.q = (_as_work(t, device, dtype) for t in (st.error, st.p, st.q))
        if self.error_feedback and st.error is None:
            st.error = torch.zeros(n, m, device=device, dtype=dtype)
        return st

    def _snapshot(self, names):
        return {nm: (self._tensors[nm].fields() if nm in self._tensors else None) for nm in names}

    def _restore(self, snapshot):
        for nm, fields in snapshot.items():
            if fields is None:
                self._tensors.pop(nm, None)
            else:
                st = self._tensors[nm]
                st.error, st.p, st.q, st.steps, st.phase = fields

    def _verify_once(self, named_grads, mats, comm):
        """Workers must agree on what they compress (else the collectives
        would mismatch and hang): compared once per list of names."""
        key = tuple(nm for nm, _ in named_grads)
        if key in self._verified:
            return
        ns = [g.shape[0] for _, g in mats]
        ms = [_columns(g) for _, g in mats]
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
            self._send_plain(plain, comm)
            return
        self._verify_once(named_grads, mats, comm)
        device = mats[0][1].device
        backend = _dispatch.resolve_backend("compress", device)
        dtype, passes = work_dtype(mats[0][1].dtype, backend), ops(backend)
        # Tensors grouped by rank (below min(n, m) only with min_compression_rate < 2): one pass each.
        groups: dict[int, list] = {}
        for nm, g in mats:
            groups.setdefault(self._rank_of(g.shape[0], _columns(g)), []).append((nm, g))
        for i, (rank, members) in enumerate(sorted(groups.items())):
            sent_plain = plain if i == 0 else []
            ok = self._part([nm for nm, _ in members + sent_plain], device)
            states = [self._state(nm, g.shape[0], _columns(g), device, dtype, passes) for nm, g in members]
            # A P step serves every tensor (each keeps an orthonormal q); a Q step needs every p.
            phase = min(st.phase for st in states) if self.alternate else 0
            self._step([(nm, g, st) for (nm, g), st in zip(members, states)], phase, rank, sent_plain, comm, ok,
                       passes, dtype)

    def _step(self, members, phase, rank, plain, comm, ok, passes, dtype):
        works = []
        for _, g, _ in members:
            work = g.reshape(g.shape[0], _columns(g))
            if work.dtype != dtype or not work.is_contiguous() or work.data_ptr() != g.data_ptr():
                work = work.to(dtype).contiguous()
            works.append(work)
        group = Group(works, [st.error for _, _, st in members], rank)
        P = torch.empty(group.p_size, device=works[0].device, dtype=dtype)
        Q = torch.empty(group.q_size, device=works[0].device, dtype=dtype)
        P_parts, Q_parts = group.p_parts(P), group.q_parts(Q)
        plain_signals, plain_names = [g for _, g in plain], [nm for nm, _ in plain]
        names = [nm for nm, _, _ in members]

        if not self.alternate:
            # 1. P = M Q from the warm (or a fresh) Q; 2. average P, orthonormalise it;
            # 3. Q = M^T P; 4. average Q; 5. gradient = P Q^T, error = M - P Q^T; Q kept warm.
            for (nm, _, st), q in zip(members, Q_parts):
                q.copy_(st.q if self.warm_start else self._fresh_q(nm, st).view_as(q))
            passes.project(group, P, Q, onto_p=True)
            self._send(plain_signals + P_parts, comm, ok, plain_names + [f"{n}:P" for n in names], len(P_parts))
            self._orthonormalize(passes, P, group, "p")
            passes.project(group, P, Q, onto_p=False)
            self._send(Q_parts, comm, ok, [f"{n}:Q" for n in names], len(Q_parts))
            passes.reconstruct(group, P, Q, P, Q, ok)
            self._record(names, P_parts, Q_parts)
            for (_, _, st), q in zip(members, Q_parts):
                st.q = q.clone()
        else:
            # Phase 0 sends P = M Q (Q orthonormal from the step before); phase 1 sends Q = M^T P.
            # The error is what this worker's factors did not carry, computed before the channel.
            sent, fixed_parts, sent_parts = (P, Q_parts, P_parts) if phase == 0 else (Q, P_parts, Q_parts)
            for (_, _, st), part in zip(members, fixed_parts):
                part.copy_(st.q if phase == 0 else st.p)
            passes.project(group, P, Q, onto_p=phase == 0)
            local = sent.clone()
            sent_names = [f"{n}:{'PQ'[phase]}" for n in names]
            self._send(plain_signals + sent_parts, comm, ok, plain_names + sent_names, len(sent_parts))
            if phase == 0:
                passes.reconstruct(group, P, Q, local, Q, ok)
            else:
                passes.reconstruct(group, P, Q, P, local, ok)
            self._record(names, P_parts, Q_parts)
            self._orthonormalize(passes, sent, group, "p" if phase == 0 else "q")
            for (_, _, st), part in zip(members, sent_parts):
                if phase == 0:
                    st.p = part.clone()
                else:
                    st.q = part.clone()
        for (_, g, st), work in zip(members, works):
            st.steps += 1
            st.phase = 1 - phase
            if work.data_ptr() != g.data_ptr():
                g.copy_(work.view_as(g))

    def _record(self, names, P_parts, Q_parts):
        """The factors whose product this step's gradients are, for compress()."""
        if self._recording:
            self._last_factors = {nm: (p.clone(), q.clone()) for nm, p, q in zip(names, P_parts, Q_parts)}

    def _fresh_q(self, name, st):
        gen = torch.Generator().manual_seed(name_seed(self.seed, name, st.steps + 1))
        return torch.randn(st.q.numel(), generator=gen, dtype=torch.float64).to(st.q)

    def _orthonormalize(self, passes, buf, group, which):
        offsets, lengths = (group.p_offsets, group.ns) if which == "p" else (group.q_offsets, group.ms)
        passes.orthonormalize(buf, offsets, lengths, group.rank, self.eps)

    # -- one tensor on one worker

    def compress(self, name, grad):
        """One step of one tensor on this worker (it advances the step, as
        reduce() does): (P (n, r), Q (m, r)) with P Q^T the compressed
        gradient, or (grad, None) for a tensor that is sent uncompressed. Error
        buffer and warm start are updated. The input is never modified; a
        skipped step (on_nonfinite="skip") returns zero factors (or zeros)."""
        _check_named_grad(name, grad)
        work = grad.detach().clone()
        self._recording, self._last_factors = True, {}
        try:
            ok = self.reduce([(name, work)])
        finally:
            self._recording = False
        factors = self._last_factors.pop(name, None)
        if factors is None:
            return work, None
        pt, qt = factors if ok else (torch.zeros_like(factors[0]), torch.zeros_like(factors[1]))
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
        """Checks every tensor's state (types, ranks, shapes that fit each
        other and this compressor's rank, finite values) before taking any;
        tensors are copied and converted to the working dtype and device at
        their next step."""
        super().load_state_dict(state)
        tensors = state.get("tensors")
        if not isinstance(tensors, dict):
            raise ValueError(f"state['tensors'] must be a dict of per-tensor states, got {type(tensors).__name__}")
        loaded = {nm: self._checked_tensor_state(nm, s) for nm, s in tensors.items()}
        self._tensors = loaded

    def _checked_tensor_state(self, name, s) -> _TensorState:
        where = f"state['tensors'][{name!r}]"
        if not isinstance(s, dict):
            raise ValueError(f"{where} must be a dict, got {type(s).__name__}")
        st = _TensorState()
        for field in ("error", "p", "q"):
            t = s.get(field)
            if t is not None and not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}[{field!r}] must be a tensor or None, got {type(t).__name__}")
            if t is not None and (t.dim() != 2 or t.dtype not in FLOAT_DTYPES):
                raise ValueError(f"{where}[{field!r}] must be a 2-D floating tensor, got {t.dtype} "
                                 f"{tuple(t.shape)}")
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}[{field!r}] has non-finite values")
            setattr(st, field, None if t is None else t.detach().clone(memory_format=torch.contiguous_format))
        for field, allowed in (("steps", None), ("phase", (0, 1))):
            v = s.get(field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (allowed and v not in allowed):
                raise ValueError(f"{where}[{field!r}] must be {'0 or 1' if allowed else 'an int >= 0'}, got {v!r}")
            setattr(st, field, v)
        n = st.error.shape[0] if st.error is not None else (st.p.shape[1] if st.p is not None else None)
        m = st.error.shape[1] if st.error is not None else (st.q.shape[1] if st.q is not None else None)
        ranks = {t.shape[0] for t in (st.p, st.q) if t is not None}
        fits = (len(ranks) <= 1 and (st.q is None or m is None or st.q.shape[1] == m)
                and (st.p is None or n is None or st.p.shape[1] == n))
        if fits and ranks and n is not None and m is not None:
            fits = ranks == {self._rank_of(n, m)}
        elif fits and ranks:
            fits = max(ranks) <= self.rank
        if not fits:
            shapes = {f: tuple(t.shape) for f, t in (("error", st.error), ("p", st.p), ("q", st.q)) if t is not None}
            raise ValueError(f"{where}: shapes {shapes} do not fit each other or rank {self.rank} (a state from "
                             "another model or rank?)")
        return st


class Laser(PowerSGD):
    """LASER (Makkuva et al., ICML 2024): alternating PowerSGD factors with
    error feedback sent over the noisy channel (module docstring) under a
    total power budget `power` per step, split over the tensors sent by
    `power_allocation` and, with column_exponent, over each factor's
    vectors (NoisyChannel); power=None is the noiseless limit (alternating
    PowerSGD). Uncompressed tensors, and the warm-up steps (start_iter),
    share the channel and the budget."""

    def __init__(self, rank=4, power=None, power_allocation="norm", column_exponent=None, min_compression_rate=2.0,
                 start_iter=0, orthogonalization_epsilon=0.0, seed=0, on_nonfinite="raise"):
        channel = NoiselessChannel() if power is None else NoisyChannel(power, power_allocation, seed,
                                                                         column_exponent)
        super().__init__(rank, error_feedback=True, warm_start=True, min_compression_rate=min_compression_rate,
                         start_iter=start_iter, orthogonalization_epsilon=orthogonalization_epsilon, alternate=True,
                         seed=seed, on_nonfinite=on_nonfinite, channel=channel)
