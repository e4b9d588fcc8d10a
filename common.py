"""
The machinery train.py, sample.py and bench.py share, so that those read as the lesson: processes and device, the
precision context and FSDP sharding, the CPU's thread count (CoreShare) and dtype probe, torch.compile, peak FLOP/s
and the loss plot. Nothing to run here: `import common`.
"""
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


def print0(*a, **k):
    """print, on the first process only (torchrun runs one per GPU)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def choose_device(device):
    """--device=auto: a CUDA GPU, else Apple's mps, else the CPU; any other value as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


@dataclass
class Procs:
    """This process's place in the run: torchrun starts `world` of them; without it, one."""
    ddp: bool         # under torchrun (DDP, or FSDP with --fsdp=True)
    rank: int
    local_rank: int   # the GPU this process uses on its machine
    world: int
    device: str


def setup_distributed(device):
    """nanoGPT-style: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them this is one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Procs(False, 0, 0, 1, choose_device(device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:  # CPU: gloo (the tests run two CPU processes this way)
        device = "cpu"
        dist.init_process_group("gloo")
    return Procs(True, rank, local_rank, world, device)


def autocast(dtype, device):
    """The precision context of a forward pass: autocast to dtype ('bfloat16', ...), or nothing in float32."""
    if dtype in ("float32", torch.float32):
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def probe_cpu(settings, seconds_of, rounds):
    """The CPU probe behind --dtype=auto in train.py and sample.py: seconds_of(setting) times the real work once in
    a setting (a dtype; in sample.py a thread count too); the settings take turns, `rounds` times, and each keeps
    its best, so that a burst of other work on the machine does not decide. No rule by CPU flag is right: bf16 was
    faster on CPUs with AVX512-BF16 or AMX and slower on one with neither (EXPERIMENTS.md, section 'Speed on a CPU
    without AMX'). The thread count is put back afterwards. -> {setting: its best seconds}"""
    n_threads, best = torch.get_num_threads(), {}
    for _ in range(rounds):
        for s in settings:
            best[s] = min(best.get(s, float("inf")), seconds_of(s))
    torch.set_num_threads(n_threads)
    return best


class CoreShare:
    """Threads = the cores other processes leave free, re-checked by update() (Linux; elsewhere it does nothing).
    Why: torch's OpenMP threads spin while they wait for each other, so beside one busy process two threads on two
    cores are slower than one: the spinning waiter burns the time slice the working thread needs. Sleeping waiters
    (OMP_WAIT_POLICY=PASSIVE) avoid that but are slower on a quiet CPU, so instead the thread count follows the load
    (EXPERIMENTS.md, section 'Speed on a CPU without AMX').
    Compiled layers recompile once per thread count they meet (Dynamo guards on it), then switch freely."""

    def __init__(self, max_threads):
        self.max, self.threads, self.others, self.last = max_threads, max_threads, 0.0, self.sample()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    @staticmethod
    def sample():
        """(wall s, CPU s used by every process, CPU s used by this one), or None where that cannot be read."""
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
            if sum(l.startswith("cpu") for l in lines) - 1 != len(os.sched_getaffinity(0)):
                return None  # we may run on only some of the machine's cores: their load is not readable here
            v = [int(x) for x in lines[0].split()[1:9]]
        except (OSError, AttributeError, ValueError):
            return None
        t = os.times()
        busy = sum(v) - v[3] - v[4]  # all but idle and iowait
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), t.user + t.system

    def settle(self):
        """The first thread count, after a full second of load seen (the rest of it slept out)."""
        if self.last is not None:
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - self.last[0])))
        return self.update()

    def update(self):
        """Set torch's thread count to the free cores seen since the last call; -> the new count if it changed."""
        now, last = self.sample(), self.last
        if now is None or last is None or now[0] - last[0] < 1.0:
            return None
        self.last = now
        self.others = max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])  # busy elsewhere
        n = max(1, min(self.max, int(self.cores - self.others + 0.5)))
        if n == self.threads:
            return None
        self.threads = n
        torch.set_num_threads(n)
        return n


def shard(model, param_dtype):
    """--fsdp=True: FSDP2 shards every layer, then the rest; mixed precision by its policy, not autocast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for blk in list(model.pre_buffer) + list(model.post_llm):
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def compile_layers(model):
    """--compile=True compiles each transformer layer in place, not the whole model: the positions and the mask
    depend on where the images sit in each pack (a graph break and a recompile per batch: EXPERIMENTS.md, section
    'Measured on one GPU'), while every layer sees the same shapes and code.
    Evaluation (KV-cache decoding, a new length each token) runs them eagerly (torch.compiler.set_stance)."""
    for block in [*model.pre_buffer, *model.post_llm]:
        block.compile()


def diverged(losses, factor=2.0):
    """-> (the first loss, the mean of the last fifth) if that mean is over factor x the first loss, else None."""
    k = len(losses) // 5
    if k == 0:
        return None
    end = sum(losses[-k:]) / k
    return (losses[0], end) if end > factor * losses[0] else None


def compile_works(device, what="training"):
    """torch.compile needs a C++ compiler on a CPU (Triton on a GPU). Try it on a one-line function first, so
    a machine without one runs eagerly after a one-line note instead of failing at the first step."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
        return True
    except Exception as e:  # no compiler, an unsupported platform or Python: all mean "eager"
        first_line = str(e).partition("\n")[0][:120]
        print0(f"torch.compile does not work here ({type(e).__name__}: {first_line}); {what} eagerly (pass "
               f"--compile=False to skip this check)")
        return False


def peak_flops(device, dtype, seconds=1.0):
    """The ceiling MFU is measured against: on a GPU its dense bf16 peak by name (vendor data sheets; inf when
    unknown, so MFU reads 0, not garbage), on a CPU the FLOP/s of a large matmul in `dtype`, measured."""
    if "cuda" in device:
        table = [("H200", 989e12), ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40", 362e12),
                 ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]
        return next((p for k, p in table if k in torch.cuda.get_device_name(device)), float("inf"))
    n, dtype = 1024, torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def draw_loss_curve(history, path):
    """history [(stage, global_step, loss)] -> a PNG with one colour per stage (PIL only)."""
    from PIL import Image, ImageDraw
    if not history:
        return
    W, H, m = 900, 420, 50
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    xs, ys = [h[1] for h in history], [h[2] for h in history]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    lo, hi = min(ys), max(max(ys), min(ys) + 1e-3)
    X = lambda x: m + (x - x0) / (x1 - x0) * (W - 2 * m)
    Y = lambda y: H - m - (y - lo) / (hi - lo) * (H - 2 * m)
    d.rectangle((m, m, W - m, H - m), outline="black")
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        d.text((4, Y(y) - 6), f"{y:.2f}", fill="black")
    colours = {"llm": (90, 90, 90), "pretrain": (200, 60, 60), "midtrain": (50, 110, 200), "spatial": (150, 90, 180),
               "sft": (40, 160, 80)}
    for s in colours:
        pts = [(X(x), Y(y)) for st, x, y in history if st == s]
        if len(pts) > 1:
            d.line(pts, fill=colours[s], width=2)
        if pts:
            d.text((pts[0][0] + 3, m + 4), s, fill=colours[s])
    d.text((W // 2 - 60, H - m + 15), "step (all stages)", fill="black")
    d.text((m, 15), "training loss (square-weighted CE)", fill="black")
    im.save(path)
