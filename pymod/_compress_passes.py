"""The passes of low-rank compression over a group of gradient matrices, and
Gram-Schmidt, on each backend: plain PyTorch (the reference), tessel._C_<level> (one
call per pass for the whole group) and tessel.kernels.compress (Triton).

A group holds matrices grads[i] (n_i, m_i), contiguous work tensors that
reconstruct() overwrites with the result, and their error buffers (None: no
error feedback). M_i = grads[i] + errors[i] is formed on the fly, so the error
buffers change only in reconstruct(). Factors are kept transposed: Pt_i
(rank, n_i) at rank * sum_{j<i} n_j of the flat P, Qt_i (rank, m_i) likewise in
Q, so every vector is contiguous and M_i ~ Pt_i^T Qt_i.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _dispatch
from ._ops import acc_dtype, numpy_view


class Group:
    """Matrices compressed together at one rank, and where their factors sit."""

    def __init__(self, grads: list[torch.Tensor], errors: list[torch.Tensor | None], rank: int):
        self.grads, self.errors, self.rank = grads, errors, rank
        self.ns = [g.shape[0] for g in grads]
        self.ms = [g.shape[1] for g in grads]
        self.p_offsets = [rank * o for o in np.cumsum([0] + self.ns[:-1]).tolist()]
        self.q_offsets = [rank * o for o in np.cumsum([0] + self.ms[:-1]).tolist()]
        self.p_size, self.q_size = rank * sum(self.ns), rank * sum(self.ms)

    def p_parts(self, P: torch.Tensor) -> list[torch.Tensor]:
        """Pt_i, (rank, n_i) views of the flat P."""
        return [P[o:o + self.rank * n].view(self.rank, n) for o, n in zip(self.p_offsets, self.ns)]

    def q_parts(self, Q: torch.Tensor) -> list[torch.Tensor]:
        return [Q[o:o + self.rank * m].view(self.rank, m) for o, m in zip(self.q_offsets, self.ms)]

    def m(self, i: int) -> torch.Tensor:
        g, e = self.grads[i], self.errors[i]
        return g if e is None else g + e


def orthogonalize_reference(M: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt on the columns of M (m, r) or each (b, m, r), in place, in
    plain PyTorch: column j loses its projections on the earlier columns twice
    (one pass leaves a dependent column's rounding noise far from orthogonal),
    then is divided by (its norm + eps), the norm taken without overflow."""
    for j in range(M.shape[-1]):
        col = M[..., j:j + 1]
        for _ in range(2):
            if j:
                done = M[..., :j]
                col.sub_(done @ (done.mT @ col))
        peak = col.abs().amax(dim=-2, keepdim=True)
        safe = torch.where(peak > 0, peak, torch.ones_like(peak))
        norm = (col / safe).norm(dim=-2, keepdim=True) * safe + eps
        col.div_(torch.where(norm == 0, torch.ones_like(norm), norm))
    return M


class ReferenceOps:
    """The passes in plain PyTorch, matrix by matrix: what the kernels are checked against."""

    def project(self, group: Group, P, Q, onto_p: bool):
        """P = Q M^T (onto_p) or Q = P M, for every matrix of the group (factors transposed)."""
        for i, (pt, qt) in enumerate(zip(group.p_parts(P), group.q_parts(Q))):
            if onto_p:
                pt.copy_(qt @ group.m(i).T)
            else:
                qt.copy_(pt @ group.m(i))

    def reconstruct(self, group: Group, p_out, q_out, p_err, q_err, keep):
        parts = zip(group.p_parts(p_out), group.q_parts(q_out), group.p_parts(p_err), group.q_parts(q_err))
        for i, (po, qo, pe, qe) in enumerate(parts):
            g, e = group.grads[i], group.errors[i]
            if e is not None:
                e.copy_(torch.where(keep, g + e - pe.T @ qe, e))
            g.copy_(torch.where(keep, po.T @ qo, g))

    def orthonormalize(self, buf, offsets, lengths, rank, eps):
        for off, length in zip(offsets, lengths):
            orthogonalize_reference(buf[off:off + rank * length].view(rank, length).T, eps)


class CppOps:
    """tessel._C_<level>: one call per pass for the whole group."""

    @staticmethod
    def _arrays(group: Group):
        return [numpy_view(g) for g in group.grads], [None if e is None else numpy_view(e) for e in group.errors]

    def project(self, group: Group, P, Q, onto_p: bool):
        _dispatch.cpp_module().compress_project(*self._arrays(group), numpy_view(P), numpy_view(Q), group.rank,
                                                onto_p, torch.get_num_threads())

    def reconstruct(self, group: Group, p_out, q_out, p_err, q_err, keep):
        # keep is read by the kernel from memory: no host synchronisation through torch.
        _dispatch.cpp_module().compress_reconstruct(*self._arrays(group), *(numpy_view(x) for x in
                                                    (p_out, q_out, p_err, q_err, keep)), group.rank,
                                                    torch.get_num_threads())

    def orthonormalize(self, buf, offsets, lengths, rank, eps):
        _dispatch.cpp_module().orthonormalize(numpy_view(buf), np.asarray(offsets, dtype=np.int64),
                                              np.asarray(lengths, dtype=np.int64), rank, 0, 1, eps,
                                              torch.get_num_threads())


def ops(backend: str):
    if backend == "cpp":
        return CppOps()
    if backend == "triton":
        return _dispatch.triton_module("compress").CompressOps()
    return ReferenceOps()


def work_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """The dtype the passes compute in: acc_dtype's, but float32 on Triton (its passes have no fp64)."""
    return torch.float32 if backend == "triton" else acc_dtype(dtype)
