"""
What nano-NEO costs on this machine, side by side in one run (each setting in its own process):

    python bench.py                    # all three parts (~10 min on a 2-core CPU)
    python bench.py --only=train       # toy training tok/s per dtype x compile, and what --dtype=auto picks
    python bench.py --only=decode      # toy decode tok/s: cached vs not, quiet and beside a busy process
    python bench.py --only=neo2b       # a NEO-2B-shaped bf16 folder with random weights in the released layout:
                                       # save, load (time, peak RSS), prefill of one 1152x1152 photo, decode,
                                       # the same with --quantize=int8 beside bf16, and sample.py on it
                                       # (needs ~12 GB RAM and 6 GB free disk in --tmp)
    python bench.py --only=video       # data.load_video on a 10 s and a 20 min 320x240 30 fps mp4 and webm (PyAV,
                                       # written to --tmp): 8 frames, time and peak RSS
    python bench.py --only=eval        # eval.py rows/s: the toy (out/final) by batch size; NEO-2B-shaped s per row
    python bench.py --only=prefill     # one NEO-2B layer's prefill vs transformers' Qwen3 layer (pip install transformers)
    python bench.py --repeats=3        # every figure 3 times: the spread tells noise from difference

A busy process is one Python loop spinning on one core, the way a laptop's other work competes for the CPU.
Each train.py --bench=True there runs train_speed below: one configuration's training tokens/s and FLOP/s; train.py
--dtype=auto on a CPU runs choose_cpu_dtype below.
"""
import argparse
import base64
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
from PIL import Image

import train
from common import CoreShare, autocast, compile_layers, peak_flops, print0, probe_cpu
from config import model_overrides
from data import to_device
from neo import NEO, NEOConfig, set_trainable
from tokenizer import get_tokenizer, special_ids

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_name():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        import platform
        return platform.processor() or platform.machine()


def python(args, busy=False, timeout=1800):
    """Run a Python command in a fresh process (optionally beside a busy loop); -> its stdout + stderr."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        p = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)
    finally:
        if spin:
            spin.kill()
            spin.wait()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p.stdout + p.stderr


def spread(xs, fmt="{:,.0f}"):
    xs = sorted(xs)
    return fmt.format(xs[len(xs) // 2]) + (f" ({fmt.format(xs[0])}-{fmt.format(xs[-1])})" if len(xs) > 1 else "")


def random_model(cfg, device, n_batches, seed):
    """The configured model with random weights, all of it trainable (midtrain), its optimizer and n_batches midtrain
    batches: what the --dtype=auto probe and the bench time train_step on."""
    # random weights: only the shapes matter, so the toy's data stands in for real data at any model size
    enc = get_tokenizer(cfg.tokenizer or "shapes")
    sp = special_ids(enc)
    ids = dict(img_start_id=sp["img_start"], img_end_id=sp["img_end"], img_context_id=sp["img_context"])
    with torch.device(device):  # made on the device (NEO-2B: no 9 GB detour through the CPU)
        model = NEO(NEOConfig.preset(cfg.model, **model_overrides(cfg), **ids))
    model.cfg.max_seq_len = max(model.cfg.max_seq_len, cfg.max_seq_len)
    model.cfg.min_pixels, model.cfg.max_pixels = train.stage_pixels(cfg, "midtrain", model.cfg)
    model.grad_checkpointing = cfg.grad_checkpointing
    set_trainable(model, "midtrain")
    opt = train.configure_optimizers(model, cfg.weight_decay, 1e-4, (cfg.beta1, cfg.beta2))
    it = iter(train.make_loader(cfg, "midtrain", enc, model.cfg, 0, 1, seed))
    return model, opt, [to_device(next(it), device) for _ in range(n_batches)]


def choose_cpu_dtype(cfg, seconds=1.0):
    """Time the real work in each dtype with common.probe_cpu and return the faster: eager training steps of the
    configured toy model on ShapesWorld batches (a released-size model: a GEMM of its width instead). Eager, not
    compiled: a cold compile takes a minute, and compiled runs kept the eager ranking on every CPU measured
    (EXPERIMENTS.md, section 'Speed on a CPU without AMX'). Prints both figures and the choice."""
    t0 = time.perf_counter()
    if cfg.model == "toy":
        model, opt, (b,) = random_model(replace(cfg, data="shapes", num_workers=0), "cpu", 1, 0)
        amount, unit = b["input_ids"].numel(), "tok/s"   # tokens per call of work()
        work = lambda dt: train.train_step(model, opt, lambda: b, autocast(dt, "cpu"), cfg.grad_clip)
    else:
        d = NEOConfig.preset(cfg.model).d_model
        x = {dt: torch.randn(512, d, dtype=getattr(torch, dt)) for dt in ("float32", "bfloat16")}
        w = {dt: torch.randn(d, d, dtype=getattr(torch, dt)) for dt in ("float32", "bfloat16")}
        amount, unit = 2 * 512 * d * d / 1e9, "GFLOP/s"
        work = lambda dt: x[dt] @ w[dt]
    for dt in ("float32", "bfloat16"):  # warm-up: first-call costs (kernel selection, allocations) off the clock
        work(dt)

    def seconds_of(dt):  # per token (per GFLOP): work(dt) again and again for a sixth of `seconds`
        t1, k = time.perf_counter(), 0
        while k == 0 or time.perf_counter() - t1 < seconds / 6:
            work(dt)
            k += 1
        return (time.perf_counter() - t1) / (k * amount)
    best = {dt: 1 / s for dt, s in probe_cpu(("float32", "bfloat16"), seconds_of, rounds=3).items()}
    choice = max(best, key=best.get)
    print0("dtype auto: " + ", ".join(f"{k} {v:,.0f} {unit}" for k, v in best.items()) +
           f" (eager, measured in {time.perf_counter() - t0:.1f} s) -> {choice}")
    return choice


def train_speed(cfg, procs):
    """train.py --bench=True: tokens/s of train.train_step on the configured model (random weights) and midtrain
    batches, and the FLOP/s that achieves against the peak (a GPU's data sheet, a CPU's measured GEMM)."""
    device = procs.device
    model, opt, batches = random_model(cfg, device, 4, cfg.seed)
    fill = sum(int((b["doc_ids"] >= 0).sum()) for b in batches) / sum(b["doc_ids"].numel() for b in batches)
    if cfg.compile:
        compile_layers(model)
    step = lambda b: train.train_step(model, opt, lambda: b, autocast(cfg.dtype, device), cfg.grad_clip)
    for b in batches:  # warm-up: every batch shape once (--compile=True compiles each here, not in the timing)
        step(b)
    if device == "cpu" and not cfg.threads:  # the thread count training would use now (CoreShare)
        cores = CoreShare(torch.get_num_threads())
        time.sleep(1.0)
        cores.update()
    n, t0 = 0, time.perf_counter()
    for k in range(8):
        step(batches[k % 4])
        n += batches[k % 4]["input_ids"].numel()
    if "cuda" in device:
        torch.cuda.synchronize()
    tps = n / (time.perf_counter() - t0)
    flops = tps * model.flops_per_token(cfg.max_seq_len)
    peak = peak_flops(device, cfg.dtype)
    gpu = "cuda" in device
    where = f"{torch.cuda.get_device_name()}" if gpu else f"{torch.get_num_threads()} threads"
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else ""
    print(f"bench: {model.num_params() / 1e6:.2f}M params, batch {cfg.batch_size}x{cfg.max_seq_len}, dtype "
          f"{cfg.dtype}{', compiled' if cfg.compile else ''}, {where}: {tps:,.0f} tok/s (rows {fill:.0%} filled), "
          f"{flops / 1e9:.1f} GFLOP/s achieved / {peak / 1e9:.1f} GFLOP/s {'bf16 data-sheet' if gpu else 'measured'} "
          f"peak = {100 * flops / peak:.1f}%{mem}")
    return tps, flops / peak


def train_part(repeats):
    """train.py --bench=True per dtype x compile (and auto), plus the auto choice against one thread and a busy CPU."""
    print("\n## training: toy, batch 8 x 192, midtrain mixture (train.py --bench=True)")
    print("| setting | tok/s | of that dtype's measured GEMM peak |\n|---|---|---|")
    rows = {}
    settings = [(d, c, t, busy) for d in ("float32", "bfloat16") for c in (False, True) for t, busy in ((0, False),)]
    settings += [("auto", True, 0, False), ("auto", True, 1, False), ("auto", True, 0, True)]
    for _ in range(repeats):
        for d, c, t, busy in settings:
            out = python(["train.py", "--bench=True", f"--dtype={d}", f"--compile={c}"] +
                         ([f"--threads={t}"] if t else []), busy=busy)
            m = re.search(r"dtype (\w+)(, compiled)?, (\d+) threads: ([\d,]+) tok/s.*= ([\d.]+)%", out)
            rows.setdefault((d, c, t, busy), []).append((float(m[4].replace(",", "")), float(m[5]), m[1]))
    for (d, c, t, busy), v in rows.items():
        name = f"{d}{' -> ' + v[0][2] if d == 'auto' else ''}, {'compiled' if c else 'eager'}" + \
               (f", {t} thread" if t else "") + (", one busy process beside it" if busy else "")
        print(f"| {name} | {spread([x[0] for x in v])} | {spread([x[1] for x in v], '{:.0f}%')} |")
    fixed = {k: sorted(x[0] for x in v)[len(v) // 2] for k, v in rows.items() if k[0] != "auto" and k[1]}
    auto = sorted(x[0] for x in rows[("auto", True, 0, False)])[len(rows[("auto", True, 0, False)]) // 2]
    print(f"--dtype=auto (compiled) reaches {auto / max(fixed.values()):.0%} of the fastest compiled setting, "
          f"{auto / fixed[('float32', True, 0, False)]:.2f}x compiled float32")


DECODE = r"""
import sys, time, torch
from neo import NEO, NEOConfig
torch.manual_seed(0)
model = NEO(NEOConfig()).eval()
cfg, mode, B = model.cfg, sys.argv[1], int(sys.argv[3])
ids = torch.tensor([[1] * 10 + [cfg.img_start_id] + [cfg.img_context_id] * 16 + [cfg.img_end_id] + [2] * 10] * B)
if sys.argv[2] == "auto":   # what sample.py does: dtype and thread count measured on one of the model's layers
    import sample
    dtype, threads = sample.choose_cpu_setting(model, ids.shape[1], 64)
    model.to(dtype)
    torch.set_num_threads(threads)
    print(f"auto: {dtype} x{threads}")
elif sys.argv[2] == "bfloat16":
    model.to(torch.bfloat16)
imgs = [torch.randn(3, 128, 128).to(next(model.parameters()).dtype)] * B   # ShapesWorld-sized images: 16 tokens
kw = dict(max_new_tokens=64, use_cache=mode != "uncached", compile=mode == "compiled")
if mode == "compiled":  # the compile itself, once, not timed
    t0 = time.perf_counter()
    model.generate(ids, imgs, **kw)
    print(f"compile {time.perf_counter() - t0:.0f} s")
best = 0
for _ in range(3):
    t0 = time.perf_counter()
    n = sum(1 for _ in model.generate_stream(ids, imgs, **kw))
    best = max(best, B * n / (time.perf_counter() - t0))
print(f"decode {best:.1f} tok/s")
"""


def decode_part(repeats):
    print("\n## decoding: the toy (5.4M parameters), one 128x128 image per row, greedy, 64 new tokens (best of 3); "
          "tok/s summed over the rows")
    print("| setting | tok/s |\n|---|---|")
    settings = [("cached", "float32", 1, False), ("uncached", "float32", 1, False), ("cached", "bfloat16", 1, False),
                ("cached", "auto", 1, False), ("compiled", "float32", 1, False), ("cached", "float32", 16, False),
                ("compiled", "float32", 16, False), ("cached", "float32", 1, True), ("cached", "auto", 1, True)]
    rows = {}
    for _ in range(repeats):
        for s in settings:
            out = python(["-c", DECODE, s[0], s[1], str(s[2])], busy=s[3])
            auto = re.search(r"auto: torch\.(\w+) x(\d+)", out)
            comp = re.search(r"compile (\d+) s", out)
            rows.setdefault(s, []).append((float(re.search(r"decode ([\d.]+) tok/s", out)[1]),
                                           f" -> {auto[1]}, {auto[2]} thread(s)" if auto else
                                           f" (compiling took {comp[1]} s)" if comp else ""))
    for (c, d, b, busy), v in rows.items():
        name = f"{c}, {d}, batch {b}{v[0][1]}" + (" (sample.py's choice)" if d == "auto" else "")
        print(f"| {name}{', one busy process beside it' if busy else ''} | {spread([x[0] for x in v])} |")


SAVE = r"""
import json, os, sys, time, torch
from safetensors.torch import save_file
import checkpoint, tokenizer
from neo import NEO, NEOConfig
cfg = NEOConfig.preset("neo-2b")
with torch.device("meta"):
    model = NEO(cfg)
model.to_empty(device="cpu").to(torch.bfloat16)
model.lm_head.weight = model.embed_tokens.weight
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for n, p in model.named_parameters():   # random weights of a trained model's scale, fast
        p.normal_(0, 0.02, generator=g) if p.dim() > 1 else p.fill_(1.0)
t0 = time.perf_counter()
# the released layout: two safetensors shards and their index, the inference kit's config format (no image ids),
# and a tokenizer.json whose added tokens sit at NEO's ids (a byte-level vocabulary: the answers are noise)
out, sd = sys.argv[1], checkpoint.hf_state_dict(model)
names = list(sd)
half = len(names) // 2
weight_map = {}
for i, part in enumerate((names[:half], names[half:])):
    fn = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: sd[k] for k in part}, os.path.join(out, fn), metadata={"format": "pt"})
    weight_map.update({k: fn for k in part})
json.dump({"weight_map": weight_map}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
hf = checkpoint.to_hf_config(cfg)
for k in ("img_start_token_id", "img_end_token_id", "img_context_token_id", "nano_neo"):
    hf.pop(k, None)
hf.update(template="neo1_0", downsample_ratio=0.5, use_backbone_lora=0, use_llm_lora=0)
json.dump(hf, open(os.path.join(out, "config.json"), "w"))
b2u = tokenizer.bytes_to_unicode()
added = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<IMG_CONTEXT>": 151669,
         "<img>": 151670, "</img>": 151671}
vocab = {b2u[b]: b for b in range(256)}   # then every id up to the added ones: three-byte tokens, none missing
vocab.update({b2u[i >> 16] + b2u[(i >> 8) & 255] + b2u[i & 255]: i for i in range(256, min(added.values()))})
json.dump({"model": {"type": "BPE", "vocab": {**vocab, **added}, "merges": []},
           "added_tokens": [{"id": i, "content": c, "special": True} for c, i in added.items()]},
          open(os.path.join(out, "tokenizer.json"), "w"))
print(f"saved {time.perf_counter() - t0:.1f} s")
"""

LOAD = r"""
import glob, os, resource, sys, time, torch
from neo import NEO, KVCache
path = sys.argv[1]
files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t0 = time.perf_counter()
for fn in files:   # the time to read the files, as loading must
    with open(fn, "rb") as f:
        while f.read(1 << 26):
            pass
t_read = time.perf_counter() - t0
t0 = time.perf_counter()
model = NEO.from_pretrained(path).eval()
t_load = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base
size = sum(os.path.getsize(fn) for fn in files) / 2**30
print(f"files {size:.2f} GiB read in {t_read:.1f} s; load {t_load:.1f} s ({t_load / t_read:.1f}x the read), "
      f"peak RSS above import {peak:.2f} GiB ({peak / size:.2f}x the files), dtype {next(model.parameters()).dtype}")
cfg = model.cfg
n_vis = (1152 // 32) ** 2
ids = torch.tensor([[1] * 12 + [cfg.img_start_id] + [cfg.img_context_id] * n_vis + [cfg.img_end_id] + [2] * 8])
img = torch.randn(3, 1152, 1152, dtype=torch.bfloat16)
with torch.inference_mode():
    cache = KVCache(cfg, 1, ids.shape[1] + 16, "cpu", torch.bfloat16)
    t0 = time.perf_counter()
    logits, _ = model(ids, [img], cache=cache, last_only=True)
    t_pre = time.perf_counter() - t0
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    model(nxt, cache=cache, last_only=True)   # one step's warm-up
    t0 = time.perf_counter()
    for _ in range(8):
        logits, _ = model(nxt, cache=cache, last_only=True)
    t_dec = (time.perf_counter() - t0) / 8
L = cfg.n_layer_total
print(f"prefill {ids.shape[1]} tokens (one 1152x1152 photo): {t_pre:.1f} s, {t_pre / L:.3f} s per layer; "
      f"decode {1 / t_dec:.2f} tok/s ({L / t_dec:.0f} tok/s x layers)")
"""

SAMPLE = r"""
import resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run([sys.executable, "sample.py", f"--init_from={sys.argv[1]}", "--image=assets/attention.png",
                    "--max_new_tokens=8"], capture_output=True, text=True)
assert p.returncode == 0, p.stderr[-2000:]
print(f"sample.py --init_from=<that folder> --image=assets/attention.png --max_new_tokens=8: "
      f"{time.perf_counter() - t0:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB")
print("  " + "\n  ".join(l for l in p.stderr.splitlines() if l.strip()))
"""


INT8 = r"""
import copy, sys, time, torch
from neo import NEO, KVCache
from quantize import quantize_int8
models = {"bf16": NEO.from_pretrained(sys.argv[1]).eval()}
models["int8"] = copy.deepcopy(models["bf16"])
print(quantize_int8(models["int8"]))
cfg, n_vis, rounds = models["bf16"].cfg, (1152 // 32) ** 2, int(sys.argv[2])
ids = torch.tensor([[1] * 12 + [cfg.img_start_id] + [cfg.img_context_id] * n_vis + [cfg.img_end_id] + [2] * 8])
img = torch.randn(3, 1152, 1152, dtype=torch.bfloat16)
pre, dec, caches, nxt = {}, {}, {}, {}
with torch.inference_mode():
    for name, model in models.items():   # prefill once each, then decode in turns: a shared CPU's drift
        caches[name] = KVCache(cfg, 1, ids.shape[1] + 9 * rounds, "cpu", torch.bfloat16)   # falls on both alike
        t0 = time.perf_counter()
        logits, _ = model(ids, [img], cache=caches[name], last_only=True)
        pre[name] = (time.perf_counter() - t0) / cfg.n_layer_total
        nxt[name] = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(rounds):
        for name, model in models.items():
            model(nxt[name], cache=caches[name], last_only=True)   # one step's warm-up
            t0 = time.perf_counter()
            for _ in range(8):
                model(nxt[name], cache=caches[name], last_only=True)
            dec.setdefault(name, []).append(8 / (time.perf_counter() - t0))
print(f"--quantize=int8 beside bf16 in one process: prefill once, then decode {rounds} times in turns (median, "
      f"min-max):")
for name, v in dec.items():
    v = sorted(v)
    print(f"  {name}: prefill {pre[name]:.3f} s per layer, decode {v[len(v) // 2]:.2f} ({v[0]:.2f}-{v[-1]:.2f}) tok/s")
"""


def neo2b_part(tmp, repeats=1):
    print("\n## a NEO-2B-shaped model (2.6B parameters, bf16, random weights) in the released layout")
    with tempfile.TemporaryDirectory(prefix="neo2b_", dir=tmp, ignore_cleanup_errors=True) as folder:
        print(python(["-c", SAVE, folder]).strip().splitlines()[-1])
        print("\n".join(python(["-c", LOAD, folder]).strip().splitlines()[-2:]))
        print("\n".join(python(["-c", INT8, folder, str(max(repeats, 3))]).strip().splitlines()[-4:]))
        print(python(["-c", SAMPLE, folder]).rstrip())  # the whole command a user types, on that folder


WRITE_VIDEO = r"""
import sys, av, numpy as np
path, n = sys.argv[1], int(sys.argv[2])  # 320x240 at 30 fps: a moving square on a still, noisy background
base = np.random.default_rng(0).integers(0, 60, (240, 320, 3), dtype=np.uint8)
with av.open(path, "w") as c:
    vp8 = path.endswith(".webm")
    s = c.add_stream("libvpx" if vp8 else "libx264", rate=30,
                     options={"deadline": "realtime", "cpu-used": "8"} if vp8 else {"preset": "ultrafast"})
    s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
    for i in range(n):
        a = base.copy()
        a[40:56, i * 2 % 304:i * 2 % 304 + 16] = 255
        c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
    c.mux(s.encode())
"""

LOAD_VIDEO = r"""
import resource, sys, time
import data
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
t0 = time.perf_counter()
if sys.argv[2] == "all":  # the reference: every frame decoded, none kept
    import av
    with av.open(sys.argv[1]) as c:
        sum(1 for _ in c.decode(video=0))
else:  # NEO-ov's per-frame budget (sample.py's neo-ov preset)
    data.load_video(sys.argv[1], 8, 4 * 1024, 360 * 640, authors=True)
print(f"{time.perf_counter() - t0:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} {rss:.0f}")
"""


def video_part(tmp, repeats):
    print("\n## video files: data.load_video(file, 8 frames), NEO-ov's frame budget, each in a fresh process")
    print("| file | size | load_video | peak RSS (after imports) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="video_", dir=tmp, ignore_cleanup_errors=True) as folder:
        for ext in (".mp4", ".webm"):
            for name, n in (("10 s", 300), ("20 min", 36000)):
                path = os.path.join(folder, f"{n}{ext}")
                python(["-c", WRITE_VIDEO, path, str(n)])
                runs = [python(["-c", LOAD_VIDEO, path, "8"]).split() for _ in range(repeats)]
                print(f"| {name} {ext} | {os.path.getsize(path) / 2**20:.1f} MiB | "
                      f"{spread([float(r[0]) for r in runs], '{:.2f} s')} | {runs[0][1]} MiB ({runs[0][2]} MiB) |")
        t, rss, _ = python(["-c", LOAD_VIDEO, os.path.join(folder, "36000.mp4"), "all"]).split()
        print(f"(decoding all 36,000 frames of the 20 min mp4, for comparison: {float(t):.1f} s, {rss} MiB)")


PREFILL = r"""
import statistics, sys, time, types, torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding
from neo import NEO, NEOConfig, Block, build_attention_mask, build_positions
dtype = getattr(torch, sys.argv[1])
torch.manual_seed(0)
cfg = NEOConfig.preset("neo-2b")
n = 36   # one photo at NEO 1.0's minimum budget: 36x36 tokens, with a short question around it
ids = torch.tensor([[1] * 12 + [cfg.img_start_id] + [cfg.img_context_id] * n * n + [cfg.img_end_id] + [2] * 8])
L = ids.shape[1]
pos, img_id = build_positions(ids, [(n, n)], cfg)
mask = build_attention_mask(torch.zeros_like(ids), img_id)
rope = NEO.rope_tables(types.SimpleNamespace(cfg=cfg), pos, dtype)
ours = Block(cfg).to(dtype).eval()
qc = Qwen3Config(hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp, num_attention_heads=cfg.n_head,
                 num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                 max_position_embeddings=40960, rope_theta=cfg.rope_theta)
qc._attn_implementation = "sdpa"
theirs = Qwen3DecoderLayer(qc, 0).to(dtype).eval()
for m in (ours, theirs):
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
x = torch.randn(1, L, cfg.d_model, dtype=dtype)
pe = Qwen3RotaryEmbedding(qc)(x, torch.arange(L)[None])
run = {"nano-NEO Block (mixed mask)": lambda: ours(x, rope, mask),
       "transformers Qwen3DecoderLayer (causal, sdpa)": lambda: theirs(x, attention_mask=None, position_embeddings=pe)}
times = {k: [] for k in run}
with torch.inference_mode():
    for f in run.values():
        f()
    for _ in range(int(sys.argv[2])):
        for k, f in run.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
for k, v in times.items():
    print(f"{k}: {statistics.median(v):.3f} s ({min(v):.3f}-{max(v):.3f})")
print(f"ratio {statistics.median(times[list(run)[0]]) / statistics.median(times[list(run)[1]]):.2f} ({L} tokens)")
"""


def prefill_part(repeats):
    print("\n## prefill of one layer at NEO-2B's widths, one photo (1,316 tokens): ours vs transformers' Qwen3 layer "
          "(pip install transformers by hand; median of 3 x --repeats)")
    try:
        import transformers  # noqa: F401  (measuring only: the project never imports it)
    except ImportError:
        print("(transformers is not installed: pip install transformers, then run again)")
        return
    for dt in ("float32", "bfloat16"):
        print(f"{dt}:\n  " + python(["-c", PREFILL, dt, str(3 * repeats)]).strip().replace("\n", "\n  "))


def rows_per_s(out):
    return float(re.search(r"\(([\d.]+) rows/s\)", out).group(1))


def eval_part(tmp, repeats):
    print("\n## eval.py: the toy (out/final) on ShapesWorld's TSV (200 held-out rows), by batch size; a NEO-2B-shaped "
          "folder (random weights) on 20 MMBench-style rows, --max_new_tokens=8")
    with tempfile.TemporaryDirectory(prefix="eval_", dir=tmp, ignore_cleanup_errors=True) as folder:
        tsv = os.path.join(folder, "ShapesWorld.tsv")
        python(["shapes.py", f"--tsv={tsv}", "--n=20"])
        if os.path.isdir(os.path.join(HERE, "out", "final")):
            print("| batch | rows/s | accuracy % |\n|---|---|---|")
            for bs in (1, 8, 32):
                outs = [python(["eval.py", f"--data={tsv}", "--init_from=out/final", f"--batch_size={bs}",
                                f"--results={folder}/toy{bs}_{k}"]) for k in range(repeats)]
                acc = re.search(r"\*\*overall\*\* \| \d+ \| ([\d.]+)", outs[0]).group(1)
                print(f"| {bs} | {spread([rows_per_s(o) for o in outs], '{:.1f}')} | {acc} |")
        else:
            print("(no out/final here: `python train.py` first for the toy's figures)")
        neo2b = os.path.join(folder, "neo2b")
        os.makedirs(neo2b)
        python(["-c", SAVE, neo2b])
        rng, rows = torch.Generator().manual_seed(0), []
        for i in range(20):  # photo-sized noise, 4:3 and 3:4: NEO 1.0 takes each to 1,280-4,096 tokens
            im = (torch.rand(3, 480, 640, generator=rng) * 255).byte().permute(1, 2, 0).numpy()
            buf = io.BytesIO()
            Image.fromarray(im if i % 2 else im.transpose(1, 0, 2).copy()).save(buf, "JPEG")
            rows.append(f"{i}\t{base64.b64encode(buf.getvalue()).decode()}\tWhat is shown?\tcat\tdog\tA")
        with open(os.path.join(folder, "MMBench_DEV_EN.tsv"), "w") as f:
            f.write("index\timage\tquestion\tA\tB\tanswer\n" + "\n".join(rows) + "\n")
        for bs in (1, 4):  # 256x256 px a photo (64 tokens; NEO 1.0's own minimum, 1,280, takes minutes a row here)
            out = python(["eval.py", f"--data={folder}/MMBench_DEV_EN.tsv", f"--init_from={neo2b}", "--dtype=float32",
                          f"--batch_size={bs}", "--max_pixels=65536", "--max_new_tokens=8",
                          f"--results={folder}/neo2b_{bs}"], timeout=7200)
            print(f"NEO-2B-shaped, float32, 20 rows of one 256x256 photo, batch {bs}: {1 / rows_per_s(out):.1f} s a row")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--only", default="train,decode,neo2b", help="comma-separated: train, decode, neo2b, video, eval, prefill")
    p.add_argument("--repeats", type=int, default=1, help="runs of every setting (default 1)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the NEO-2B folder and videos are written")
    a = p.parse_args()
    parts = {"train": lambda: train_part(a.repeats), "decode": lambda: decode_part(a.repeats),
             "neo2b": lambda: neo2b_part(a.tmp, a.repeats), "video": lambda: video_part(a.tmp, a.repeats),
             "eval": lambda: eval_part(a.tmp, a.repeats), "prefill": lambda: prefill_part(a.repeats)}
    if (bad := set(a.only.split(",")) - set(parts)) or a.repeats < 1:
        sys.exit(f"bench.py: --only takes train, decode, neo2b, video, eval, prefill (got {', '.join(sorted(bad))}); --repeats >= 1")
    print(f"# bench.py: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    t0 = time.perf_counter()
    for name, run in parts.items():  # in this order, whatever the order of --only
        if name in a.only.split(","):
            run()
    print(f"\n({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
