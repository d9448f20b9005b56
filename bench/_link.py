"""Data-parallel training over a bandwidth-limited link: where gradient
compression is the point.

`python -m bench compress --link 1gbit` makes two Linux network namespaces
(tessel-bench-a, tessel-bench-b) joined by a veth pair whose bandwidth is
limited by a token-bucket filter (tc tbf) in both directions, starts one gloo
worker in each (`ip netns exec`), and times a real training step (forward,
backward with the communication hook, optimizer) of a ResNet-18-sized and a
GPT-2-small-sized model with each hook (the mean over 20 or 5 steps, the
faster of two rounds). The namespaces are removed on exit, also on error or Ctrl-C;
traffic flows only between them. Without the rights to make namespaces the
bench says so and skips.

Rows per model: plain all-reduce (no hook), torch's fp16_compress_hook,
torch's powerSGD_hook (DDP's 25 MB buckets, and in one bucket), tessel's
powersgd_hook (asynchronous; synchronous, overlap=False; alternate=True), and
two references: the same step with no communication, and with tessel's hook
on a group of one worker (compression compute, no network: the bound an
overlapped hook can reach).
"""

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

NAMESPACES = ("tessel-bench-a", "tessel-bench-b")
VETH = ("tsl-bench-a", "tsl-bench-b")
ADDRESSES = ("10.213.7.1", "10.213.7.2")
RATES = {"1gbit": "1gbit", "10gbit": "10gbit", "100mbit": "100mbit"}
RANK = 4
ROUNDS = 2  # timed rounds of `steps` steps per provider
STEPS = {"resnet18": 20, "gpt2-small": 5}  # per round: a round of either takes seconds


class LinkUnavailable(RuntimeError):
    pass


def _ip(*args, check=True):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise LinkUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _remove_namespaces():
    for ns in NAMESPACES:
        _ip("netns", "del", ns, check=False)  # deleting a namespace deletes its end of the veth pair


@contextlib.contextmanager
def link(rate: str):
    """Two namespaces joined by a veth pair limited to `rate` each way; removed on exit, whatever happens."""
    if rate not in RATES:
        raise ValueError(f"--link must be one of {sorted(RATES)}, got {rate!r}")
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill runs the cleanup below too
    try:
        _remove_namespaces()  # left over by a run that was killed hard
        for ns in NAMESPACES:
            _ip("netns", "add", ns)
        _ip("link", "add", VETH[0], "netns", NAMESPACES[0], "type", "veth", "peer", "name", VETH[1], "netns",
            NAMESPACES[1])
        for ns, dev, addr in zip(NAMESPACES, VETH, ADDRESSES):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            done = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                   "rate", RATES[rate], "burst", "1mb", "latency", "50ms"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise LinkUnavailable(f"tc tbf on {dev} failed: {done.stderr.strip()}")
        yield
    finally:
        _remove_namespaces()
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- models (real layers, small inputs)


class _Basic(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.skip = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.skip(x))


def resnet18():
    layers = [torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
        cin = cout
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(512, 1000)]
    model = torch.nn.Sequential(*layers)

    def batch(gen):
        x = torch.randn(2, 3, 64, 64, generator=gen)
        return x, torch.randint(0, 1000, (2,), generator=gen)

    return model, batch, torch.nn.functional.cross_entropy


class _GPT2(torch.nn.Module):
    """GPT-2 small's weights: 50257 x 768 tied embedding, 1024 positions, 12 pre-norm blocks."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(50257, 768), torch.nn.Embedding(1024, 768)
        block = dict(d_model=768, nhead=12, dim_feedforward=3072, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(**block) for _ in range(12)])
        self.norm = torch.nn.LayerNorm(768)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.norm(x) @ self.tok.weight.T


def gpt2_small():
    def batch(gen):  # 8 tokens: the step is dominated by its gradients' size, as in the study that motivated this
        tokens = torch.randint(0, 50257, (1, 9), generator=gen)
        return tokens[:, :-1], tokens[:, 1:]

    def loss(logits, target):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    return _GPT2(), batch, loss


MODELS = {"resnet18": resnet18, "gpt2-small": gpt2_small}


# ---------------------------------------------------------------- one worker (run inside a namespace)


def _noop_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _providers(rank, world):
    """name -> (make the hook state and hook for a model, DDP bucket cap in MB)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

    from tessel import distributed as td

    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank makes every group

    def tessel(group=None, **kw):
        def make(model):
            state = td.PowerSGDState(group, RANK, start_powerSGD_iter=2, model=model, **kw)
            return state, td.powersgd_hook
        return make

    def sync(model):
        state, hook = tessel()(model)
        state.overlap = False
        return state, hook

    return {
        "no_comm": (lambda m: (None, _noop_hook), 25),
        "compute": (tessel(alone), 25),
        "allreduce": (lambda m: (None, None), 25),
        "fp16": (lambda m: (None, default_hooks.fp16_compress_hook), 25),
        "tessel": (tessel(), 25),
        "tessel_sync": (sync, 25),
        "tessel_alternate": (tessel(alternate=True), 25),
        "torch_powersgd_1bucket": (lambda m: (torch_psgd.PowerSGDState(None, RANK, 2), torch_psgd.powerSGD_hook),
                                   10_000),
        # Last: it may break the process group (see README).
        "torch_powersgd": (lambda m: (torch_psgd.PowerSGDState(None, RANK, 2), torch_psgd.powerSGD_hook), 25),
    }


PROVIDERS = ("no_comm", "compute", "allreduce", "fp16", "tessel", "tessel_sync", "tessel_alternate",
             "torch_powersgd_1bucket", "torch_powersgd")


def _time_provider(model_name, make, cap, rank, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model, batch, loss_fn = MODELS[model_name]()
    ddp = DDP(model, bucket_cap_mb=cap)
    state, hook = make(model)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)

    def step():
        x, y = batch(gen)
        loss = loss_fn(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):  # past start_powerSGD_iter = 2, and one compressed step
        step()
    best = float("inf")
    for _ in range(ROUNDS):  # the faster round: a passing stall of this shared VM costs every provider alike
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        dist.barrier()
        best = min(best, (time.perf_counter() - start) / steps)
    sent = None if state is None or not hasattr(state, "compressor") else state.compressor.floats_sent
    return best, sent


def worker(rank, world, master, port, model_name, steps, out_path, timeout_s, only=None):
    """Times every provider (or those in `only`) on one model; rank 0 writes {name: seconds or the error}."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = VETH[rank]
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    for name, (make, cap) in _providers(rank, world).items():
        if only and name not in only:
            continue
        try:
            seconds, sent = _time_provider(model_name, make, cap, rank, steps)
            results[name] = {"s": seconds, "floats_sent": sent, "compressed_steps": ROUNDS * steps + 1}
        except Exception as err:  # torch's hook aborting on gloo: reported, not fatal
            # Callback errors nest ("Got the following error when running the callback: ..."): the innermost says why.
            text = str(err).splitlines()[0]
            results[name] = {"error": text[text.rfind("Error: ") + len("Error: "):][:200] if "Error: " in text
                             else f"{type(err).__name__}: {text[:200]}"}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
        if "error" in results[name]:
            break  # the process group is not usable after a collective mismatch
    os._exit(0)  # a broken group may hang in its destructor


# ---------------------------------------------------------------- the driver


def _abort_reason(logs) -> str:
    """The line in which a worker's C++ runtime said why it aborted (gloo's enforce), if any."""
    for log in logs:
        log.seek(0)
        for line in log:
            if "what():" in line:
                return line.split("what():", 1)[1].strip()[:200]
    return "no reason printed"


def rows(rate: str, quick: bool) -> list[dict]:
    """Every provider's step time over the link, one row per model; [] when no link can be made."""
    try:
        with link(rate):
            return [_model_row(rate, model, quick) for model in (["resnet18"] if quick else list(MODELS))]
    except LinkUnavailable as err:
        print(f"bench compress --link {rate}: skipped, no network namespaces here ({err})")
        return []


def _wait_for_workers(procs, out, stall_s) -> bool:
    """Waits for the workers; kills them when no provider has finished for stall_s seconds (torch's
    powerSGD_hook has hung past gloo's own timeout). Returns True when they were killed."""
    seen, last = None, time.monotonic()
    while any(p.poll() is None for p in procs):
        stamp = os.path.getmtime(out) if os.path.exists(out) else None
        if stamp != seen:
            seen, last = stamp, time.monotonic()
        if time.monotonic() - last > stall_s:
            for p in procs:
                p.kill()
            return True
        time.sleep(1)
    return False


def _model_row(rate, model, quick):
    steps = 2 if quick else STEPS[model]
    timeout_s = 600
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        logs = [open(os.path.join(tmp, f"worker{rank}.log"), "w+") for rank in range(len(NAMESPACES))]
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "bench._link", "worker",
                                   str(rank), ADDRESSES[0], "29641", model, str(steps), out, str(timeout_s)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
                 for rank, (ns, log) in enumerate(zip(NAMESPACES, logs))]
        try:
            hung = _wait_for_workers(procs, out, timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        results = {}
        if os.path.exists(out):
            with open(out) as f:
                results = json.load(f)
        died = f"hung: no provider finished in {timeout_s} s, workers killed" if hung else _abort_reason(logs)
    numel = sum(p.numel() for p in MODELS[model]()[0].parameters())
    row = {"suite": "compress", "case": f"{model}-r{RANK}", "mode": f"link-{rate}", "dtype": "float32",
           "device": "cpu", "params_m": numel / 1e6}
    tessel_s = results.get("tessel", {}).get("s")
    for name in PROVIDERS:
        # A provider without a result took the workers down with it (gloo aborts the process).
        results.setdefault(name, {"error": f"worker aborted: {died}"})
    for name, res in results.items():
        if "error" in res:
            row[f"{name}_error"] = res["error"]
            continue
        row[f"{name}_ms"] = 1e3 * res["s"]
        if tessel_s and name != "tessel":
            row[f"x_{name}"] = res["s"] / tessel_s
    row["allreduce_mb"] = 4 * numel / 2**20
    if results.get("tessel", {}).get("floats_sent") is not None:
        row["tessel_mb"] = 4 * results["tessel"]["floats_sent"] / results["tessel"]["compressed_steps"] / 2**20
    peers = [n for n in ("allreduce", "fp16", "torch_powersgd", "torch_powersgd_1bucket") if f"{n}_ms" in row]
    if tessel_s and peers:  # what a user would run instead (the bounds no_comm and compute are not)
        best = min(peers, key=lambda n: row[f"{n}_ms"])
        row.update(best_peer=best, x_best=row[f"x_{best}"])
    if tessel_s and "s" in results["compute"]:
        # The bound: the same step with the compression compute and no network (a group of one).
        row["tessel_over_bound"] = tessel_s / results["compute"]["s"]
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["worker"])
    parser.add_argument("rank", type=int)
    parser.add_argument("master")
    parser.add_argument("port", type=int)
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("timeout_s", type=int)
    parser.add_argument("--only", nargs="*", choices=PROVIDERS)
    a = parser.parse_args()
    worker(a.rank, 2, a.master, a.port, a.model, a.steps, a.out, a.timeout_s, a.only)
