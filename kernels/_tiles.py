"""Tile helpers shared by the Triton kernel modules."""
import triton
import triton.language as tl


@triton.jit
def load_tile(base, rows, cols, stride_row, n_rows, n_cols):
    """[len(rows), len(cols)] tile of a row-major matrix, zero outside."""
    return tl.load(base + rows[:, None] * stride_row + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
