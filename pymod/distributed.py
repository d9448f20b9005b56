"""DDP communication hooks: PowerSGD, LASER and Z-SGD over torch.distributed.

    state = tessel.distributed.PowerSGDState(process_group=None, matrix_approximation_rank=4)
    ddp_model.register_comm_hook(state, tessel.distributed.powersgd_hook)

The hooks keep the contract of torch.distributed.algorithms.ddp_comm_hooks:
hook(state, bucket: dist.GradBucket) -> torch.futures.Future of the bucket's
flat gradient, averaged over the workers. PowerSGDState takes the arguments of
torch's PowerSGDState (same names and defaults), so switching from torch's
hook is a one-word change. Each state wraps a tessel.compress compressor and
adds what DDP needs: the step counter (advanced at the last bucket of a
backward), gradients named by parameter (pass `model` to name them as
model.named_parameters() does), and state_dict() / load_state_dict() for
checkpoints that resume bit for bit.
"""
import torch
import torch.distributed as dist

from .compress import Laser, PowerSGD, ProcessGroupComm, ZSGD


class _HookState:
    def __init__(self, compressor, process_group, model):
        self.compressor = compressor
        self.process_group = process_group
        self._comm = None
        self._names = None if model is None else {id(p): name for name, p in model.named_parameters()}

    @property
    def comm(self):
        if self._comm is None:
            self._comm = ProcessGroupComm(self.process_group)
        return self._comm

    @property
    def iter(self) -> int:
        return self.compressor.iteration

    def gradient_names(self, bucket):
        params = bucket.parameters()
        if self._names is not None and all(id(p) in self._names for p in params):
            return [self._names[id(p)] for p in params]
        return [f"bucket{bucket.index()}.{i}" for i in range(len(params))]

    def state_dict(self) -> dict:
        return self.compressor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state)


class PowerSGDState(_HookState):
    """torch's PowerSGDState arguments (same names and defaults), plus
    alternate (one factor, one collective per step), on_nonfinite ("raise" or
    "skip") and model (names in errors and checkpoints).
    batch_tensors_with_same_shape is accepted for compatibility: tessel
    always processes a bucket's matrices in one call per pass."""

    def __init__(self, process_group, matrix_approximation_rank=1, start_powerSGD_iter=1_000,
                 min_compression_rate=2, use_error_feedback=True, warm_start=True, orthogonalization_epsilon=0,
                 random_seed=0, compression_stats_logging_frequency=10_000, batch_tensors_with_same_shape=False,
                 *, alternate=False, on_nonfinite="raise", model=None):
        if (use_error_feedback or warm_start) and start_powerSGD_iter <= 1:
            raise ValueError(
                "start_powerSGD_iter must be > 1 when use_error_feedback or warm_start is on: DDP rebuilds its "
                "buckets after the first iteration, so compression starts from the second"
            )
        compressor = PowerSGD(matrix_approximation_rank, error_feedback=use_error_feedback, warm_start=warm_start,
                              min_compression_rate=min_compression_rate, start_iter=start_powerSGD_iter,
                              orthogonalization_epsilon=orthogonalization_epsilon, alternate=alternate,
                              seed=random_seed, on_nonfinite=on_nonfinite)
        super().__init__(compressor, process_group, model)
        self.matrix_approximation_rank = matrix_approximation_rank
        self.start_powerSGD_iter = start_powerSGD_iter
        self.compression_stats_logging_frequency = compression_stats_logging_frequency


class LaserState(_HookState):
    """LASER over the simulated noisy uplink (tessel.compress.Laser): rank,
    power (None: noiseless), power_allocation ("norm" or "uniform") over
    tensors, column_exponent (None, or a: over each factor's vectors by
    norm^a), start_iter uncompressed noiseless steps first."""

    def __init__(self, process_group=None, rank=4, power=None, power_allocation="norm", column_exponent=None,
                 start_iter=2, min_compression_rate=2.0, orthogonalization_epsilon=0.0, seed=0, on_nonfinite="raise",
                 model=None):
        compressor = Laser(rank, power, power_allocation=power_allocation, column_exponent=column_exponent,
                           min_compression_rate=min_compression_rate,
                           start_iter=start_iter, orthogonalization_epsilon=orthogonalization_epsilon, seed=seed,
                           on_nonfinite=on_nonfinite)
        super().__init__(compressor, process_group, model)


class ZSGDState(_HookState):
    """Z-SGD: uncompressed gradients over the same noisy uplink (the LASER
    baseline); power=None is exact averaging."""

    def __init__(self, process_group=None, power=None, power_allocation="norm", seed=0, on_nonfinite="raise",
                 model=None):
        super().__init__(ZSGD(power, power_allocation, seed, on_nonfinite), process_group, model)


def _done(value):
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


def _compressed_hook(state: _HookState, bucket):
    comp = state.compressor
    last = bucket.is_last()
    if comp.iteration < getattr(comp, "start_iter", 0):
        # Uncompressed warm-up, as torch's hook: one asynchronous all-reduce of the flat bucket.
        world = state.comm.world_size
        work = dist.all_reduce(bucket.buffer(), group=state.process_group, async_op=True)
        if last:
            comp.iteration += 1

        def mean(fut):
            return fut.value()[0].div_(world)

        return work.get_future().then(mean)
    grads = bucket.gradients()
    comp.reduce(list(zip(state.gradient_names(bucket), grads)), state.comm, advance=last)
    buffer = bucket.buffer()
    if grads and grads[0].data_ptr() != buffer.data_ptr():
        # Gradients that are not views of the flat buffer go back into it.
        torch.cat([g.reshape(-1) for g in grads], out=buffer)
    return _done(buffer)


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PowerSGD communication hook (see PowerSGDState)."""
    return _compressed_hook(state, bucket)


def laser_hook(state: LaserState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """LASER communication hook (see LaserState)."""
    return _compressed_hook(state, bucket)


def zsgd_hook(state: ZSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Z-SGD communication hook (see ZSGDState)."""
    return _compressed_hook(state, bucket)
