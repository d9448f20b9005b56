"""DDP communication hooks: PowerSGD, LASER and Z-SGD over torch.distributed.

    state = tessel.distributed.PowerSGDState(process_group=None, matrix_approximation_rank=4)
    ddp_model.register_comm_hook(state, tessel.distributed.powersgd_hook)

The hooks keep the contract of torch.distributed.algorithms.ddp_comm_hooks:
hook(state, bucket: dist.GradBucket) -> torch.futures.Future of the bucket's
flat gradient, averaged over the workers. PowerSGDState takes the arguments of
torch's PowerSGDState (same names and defaults), so switching from torch's
hook is a one-word change. Each state wraps a tessel.compress compressor and
adds what DDP needs: gradients named by parameter (pass `model` to name them
as model.named_parameters() does) and state_dict() / load_state_dict() for
checkpoints that resume bit for bit.

How a step runs, asynchronously:
1. The hook hands the bucket to the state's communication thread and returns
   a Future at once: the backward of the remaining layers goes on while the
   bucket is compressed and its collectives travel.
2. That one thread issues every collective of the step, bucket after bucket
   in DDP's order, so all workers issue them in the same order (torch's
   powerSGD_hook issues the second all-reduce of a bucket from a callback
   thread while the autograd thread issues the next bucket's first one, and
   gloo aborts on the mismatch).
3. A bucket's Future completes as soon as the thread has averaged it. At the
   last bucket the hook waits for the thread to finish the step, then the
   compressor reads the step's finiteness flags from the device once (the only
   host synchronisation of a step; none per collective): a skipped step zeroes
   every bucket (DDP reads none before the last hook returns), a raising one
   raises from that hook. DDP's own collectives after the backward never
   interleave with ours.
An exact uncompressed step (warm-up over a noiseless channel) is one
asynchronous all-reduce of the flat bucket, as in torch's hooks.
"""

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from .compress import Laser, PowerSGD, ProcessGroupComm, ZSGD


class _HookState:
    """What every hook state shares: the compressor, the process group, the
    communication thread and the parts of the step under way.

    overlap: True runs the buckets on the communication thread; False runs
    each on the calling thread before the hook returns (same results; for
    measuring what the overlap earns)."""

    overlap = True

    def __init__(self, compressor, process_group, model):
        self.compressor = compressor
        self.process_group = process_group
        self._comm = None
        self._names = None if model is None else {id(p): name for name, p in model.named_parameters()}
        self._thread = None
        self._pending = []  # this step's (future, bucket buffer, job)
        self._failed = None  # the error that ended this step's work on the thread

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

    # -- one bucket, one step

    def submit(self, bucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        fut = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
        args = (self.gradient_names(bucket), bucket.gradients(), buffer,
                torch.cuda.current_stream(buffer.device) if buffer.is_cuda else None,
                _get_current_dispatch_mode_stack())
        if self.overlap:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="tessel-comm")
            job = self._thread.submit(self._reduce_bucket, fut, *args)
        else:
            job = _run_now(self._reduce_bucket, fut, *args)
        self._pending.append((fut, buffer, job))
        if bucket.is_last():
            self._finish_step()
        return fut

    def _reduce_bucket(self, fut, names, grads, buffer, stream, modes):
        if self._failed is not None:
            return  # an earlier bucket failed on every worker alike: issue nothing more
        try:
            # The caller's stream and dispatch modes (e.g. a profiler's) hold on this thread too.
            with contextlib.ExitStack() as scope:
                if stream is not None:
                    scope.enter_context(torch.cuda.stream(stream))
                for mode in modes:
                    scope.enter_context(mode)
                scope.enter_context(torch.no_grad())
                self.compressor.reduce_bucket(zip(names, grads), self.comm)
                if grads and grads[0].data_ptr() != buffer.data_ptr():
                    # Gradients that are not views of the flat buffer go back into it.
                    torch.cat([g.reshape(-1) for g in grads], out=buffer)
                # Done: a caller may wait on this bucket alone. DDP reads no bucket before the last
                # hook has returned, so a skipped step can still zero it in _finish_step.
                fut.set_result(buffer)
        except BaseException as err:
            self._failed = err
            raise

    def _finish_step(self):
        pending, self._pending = self._pending, []
        try:
            for _, _, job in pending:
                job.result()
            ok = self.compressor.end_step()
        except BaseException as err:
            self._failed = None
            self.compressor.abandon_step()
            for fut, _, _ in pending:
                if not fut.done():
                    fut.set_exception(err)
            raise
        if not ok:
            for _, buffer, _ in pending:
                buffer.zero_()


def _run_now(fn, *args) -> Future:
    """fn(*args) on the calling thread, as a finished job: result() re-raises its error at the step's end."""
    job = Future()
    try:
        job.set_result(fn(*args))
    except Exception as err:
        job.set_exception(err)
    return job


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
    norm^a), start_iter uncompressed steps first (through the same noisy
    channel)."""

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


def _compressed_hook(state: _HookState, bucket):
    comp = state.compressor
    if comp.plain_step():
        # Exact and uncompressed, as torch's hook: one asynchronous all-reduce of the flat bucket.
        world = state.comm.world_size
        work = dist.all_reduce(bucket.buffer(), group=state.process_group, async_op=True)
        if bucket.is_last():
            comp.end_step()
        return work.get_future().then(lambda fut: fut.value()[0].div_(world))
    return state.submit(bucket)


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PowerSGD communication hook (see PowerSGDState and the module docstring)."""
    return _compressed_hook(state, bucket)


def laser_hook(state: LaserState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """LASER communication hook (see LaserState and the module docstring)."""
    return _compressed_hook(state, bucket)


def zsgd_hook(state: ZSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Z-SGD communication hook (see ZSGDState and the module docstring)."""
    return _compressed_hook(state, bucket)
