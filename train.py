"""
Train NEO: the paper's three stages (and the toy's own llm and spatial stages), on a CPU for the toy or on many
GPUs at full scale. Read top to bottom: the config, each stage's recipe, one stage (set up, the training loop that
every stage runs through, finish), main. Beside it: config.py reads the command line, evaluate.py scores a stage,
common.py holds the machinery, bench.py times the step (--bench=True, --dtype=auto).

    python train.py                                   # whole toy pipeline on ShapesWorld (~12-16 min on 2 cores)
    python train.py --stage=midtrain --max_iters=200  # one stage, starting from out/pretrain
    python train.py --iters_scale=4 --spatial_curriculum=True  # the long run: spatial relations too (~56 min)
    python train.py --resume=True                     # continue exactly where out/ckpt.pt stopped
    python train.py --bench=True                      # tokens/s and achieved FLOP/s / measured peak
    python train.py my_config.py --learning_rate=1e-3 # a config file first, then overrides
    torchrun --standalone --nproc_per_node=8 train.py --stage=pretrain --model=neo-2b \\
        --init_from=/path/Qwen3-1.7B-Base --data=ann.jsonl --image_root=/path/images
    torchrun --standalone --nproc_per_node=8 train.py --stage=midtrain --model=neo-9b --fsdp=True ...

Stages: llm (toy only: a text LM standing in for a pretrained Qwen3) -> pretrain (the LLM frozen) -> midtrain ->
spatial (toy only, --spatial_curriculum) -> sft. `--stage=all` runs them in order (README, "The toy").
"""
import errno
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, field, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import shapes
import tokenizer
from common import (CoreShare, autocast, compile_layers, compile_works, diverged, draw_loss_curve, peak_flops,
                    print0, setup_distributed, shard)
from evaluate import evaluate_stage
from config import ConfigError, check_config, coerce, model_overrides, read_args  # (coerce: for ablate.py)
from neo import NEO, NEOConfig, PRESETS, set_trainable


# -----------------------------------------------------------------------------
# Config: every key, with the toy's defaults. `python train.py --key=value` overrides any of them.


@dataclass
class TrainConfig:
    # what to train
    stage: str = "all"            # llm|pretrain|midtrain|spatial|sft|all (all: in that order, as the docstring says)
    model: str = "toy"            # NEOConfig preset: toy|neo-2b|neo-9b
    init_from: str = ""           # '' = the previous stage's folder in out_dir (llm: scratch); else a Qwen3
    #                               folder, a released NEO folder, or one of ours (folder or ckpt.pt)
    out_dir: str = "out"
    # data
    data: str = "shapes"          # 'shapes' = the built-in ShapesWorld, else a LLaVA/NEO JSON/JSONL file
    image_root: str = ""          # folder the JSONL's image paths are relative to
    min_pixels: int = -1          # pixel budget of one image, every stage this command runs; -1 = the model's own
    max_pixels: int = -1          # (the starting folder's config.json, else the preset's), or --recipe=scripts's
    #                               per stage. Saved in each stage folder's config.json, so sample.py uses them
    tokenizer: str = ""           # '' = the init_from folder's own tokenizer files, else 'shapes' (toy)
    num_workers: int = 0          # loader worker processes
    # model shape and the ablation switches (ablate.py); -1 = the preset's value
    d_model: int = -1
    n_layer: int = -1
    n_pre_layers: int = -1
    n_head: int = -1
    n_kv_head: int = -1
    head_dim: int = -1
    d_mlp: int = -1
    vision_dim: int = -1
    rope: str = "native"          # native|1d (1d: every token, visual ones too, gets its own t)
    mask: str = "mixed"           # mixed|causal (causal: no bidirectional attention inside an image)
    rope_theta_hw: float = -1.0   # base of the H/W rotary channels (1e4 in NEO)
    patch_rope: bool = True       # the patch embedding's 2-D rotation of patch features (NEO: on)
    # optimisation; 0 or -1 = the stage's recipe value (STAGES below)
    recipe: str = "paper"         # paper|scripts: at full scale, the paper's recipe or the released training
    #                               scripts' (rows and pixel budgets too); the toy has its own
    max_iters: int = 0            # optimizer steps per stage
    iters_scale: float = 1.0      # multiplies every stage's recipe steps (a longer toy run: --iters_scale=4)
    learning_rate: float = 0.0    # peak LR
    min_lr_ratio: float = -1.0    # cosine decays to learning_rate * min_lr_ratio
    warmup_iters: int = -1
    vision_lr_scale: float = -1.0 # LR multiplier of the patch embedding; -1 = the recipe's (vision_lr_scale())
    spatial_curriculum: bool = False  # toy: teach spatial relations (top-to-bottom captions, the spatial
    #                               stage, more relation questions in sft; shapes.SPATIAL_CURRICULUM says why)
    places: bool = True           # toy: video_dir answers name the first and last cell, then the direction, and
    #                               pretrain adds captions with cells; False: one word (shapes.PLACES says why)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95           # the released scripts' 0.95 (the paper says 0.999)
    grad_clip: float = 1.0
    batch_size: int = 8           # packed rows per micro-step per process. Toy: 8 rows learn more in the same time
    #                               than 16 or 4 (EXPERIMENTS.md, section 'Earlier findings')
    max_seq_len: int = 192        # tokens per packed row (ShapesWorld samples are 20-180 tokens; a row's
    #                               attention is dense, so longer rows cost more per token on a CPU); 0 = the
    #                               stage's row in --recipe=scripts (its default there)
    grad_accum: int = 1           # micro-steps per optimizer step, over all processes together
    # system
    device: str = "auto"          # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"           # auto|bfloat16|float32 autocast, weights in float32 (auto: resolve_dtype())
    compile: bool = True          # torch.compile each layer for training (off by itself where it cannot work)
    fsdp: bool = False            # FSDP2 (fully_shard) instead of DDP under torchrun
    grad_checkpointing: bool = False  # activation checkpointing (recompute each layer in backward)
    threads: int = 0              # CPU threads; 0 = the cores other processes leave free (CoreShare)
    seed: int = 1337
    # loop, evaluation, checkpoints
    log_interval: int = 10
    eval_interval: int = 100      # steps between checkpoints (out_dir/ckpt.pt)
    eval_samples: int = 40        # held-out prompts per task family in the end-of-stage evaluation
    eval_batch: int = 64          # prompts generated together
    blind: bool = True            # after the last stage, also evaluate with images replaced by noise
    eval_every_stage: bool = True # False: evaluate only after the last stage (the ablation's setting)
    probe_weight: float = 0.0     # > 0: ShapesWorld's probe families (shapes.PROBE_FAMILIES) join the midtrain and sft
    #                               mixtures at this weight each and the evaluation (ablate.py)
    resume: bool = False          # continue from out_dir/ckpt.pt (same config)
    bench: bool = False           # measure tokens/s and FLOP/s on the toy, then exit
    kill_at: int = 0              # tests: stop dead right after this step, as a crash would (0 = never)


# Full-scale presets change these defaults (only the keys not given on the command line).
FULL_SCALE = dict(batch_size=1, max_seq_len=8192, grad_accum=64, grad_checkpointing=True, eval_interval=1000,
                  log_interval=1, blind=False, eval_samples=0)


class TrainError(RuntimeError):
    """A run that cannot go on for a reason the user can act on (a NaN, a locked out_dir, an unreadable
    checkpoint, a full disk): one line on stderr, exit code 1."""


# Keys a resumed run may change (--resume=True): where and how fast it runs, what it logs, evaluates and
# checkpoints, and the step size (the remedy after a NaN stop). Any other key that differs from the checkpoint's
# config is refused: it would silently make another run out of this one (another schedule, batch, data or model).
RESUME_SAFE = ("out_dir", "resume", "kill_at", "device", "dtype", "compile", "threads", "num_workers", "fsdp",
               "grad_checkpointing", "log_interval", "eval_interval", "eval_samples", "eval_batch", "blind",
               "eval_every_stage", "learning_rate", "grad_clip")


def parse_config(argv, saved=None):
    """[config.py] --key=value ... -> TrainConfig, every key checked. saved: the config of the run being resumed
    (its checkpoint's train_config), the base instead of the defaults; a key given here that is not in RESUME_SAFE
    must keep its saved value. Raises ConfigError with one line saying what is wrong."""
    defaults = asdict(TrainConfig())
    given = read_args(argv, defaults)
    if saved is not None:
        for k, v in given.items():
            if k not in RESUME_SAFE and k in saved and saved[k] != v:
                raise ConfigError(f"--{k}={v} differs from the run being resumed ({k}={saved[k]!r}); a resumed run "
                                  f"keeps its config, except {', '.join(RESUME_SAFE)}: drop --{k}, or start a new "
                                  f"run in another --out_dir")
        base = {**defaults, **{k: v for k, v in saved.items() if k in defaults}, "kill_at": 0}
    else:
        base = {**defaults, **(FULL_SCALE if given.get("model", "toy") != "toy" else {})}
        if given.get("recipe") == "scripts":  # each stage its scripts' row length, unless --max_seq_len is given
            base["max_seq_len"] = 0
    cfg = TrainConfig(**{**base, **given})
    check_config(cfg, ORDER, stage_recipe)
    return cfg


# -----------------------------------------------------------------------------
# Recipe: each stage's learning rate, schedule and steps, and what trains at which rate


# Per-stage recipe. `paper`: the paper's (NEO: pretrain 8e-4 -> 0.05x, warm-up 2k of 190k steps; mid-train and SFT 5e-5
# -> 0.1x; AdamW, wd 0.01, clip 1.0, cosine). `scripts` (--recipe=scripts): the released VLMTrainKit/scripts/2B_*.sh
# (`scripts_9b`: 8B_*.sh where they differ), with each stage's row (their --max_seq_length; pretrain's unused
# --model_max_length 8192 is not one) and pixel budget; a warm-up under 1 is their --warmup_ratio, rounded up as Hugging
# Face's Trainer does. `toy`: the toy's own (`toy_curriculum`: with --spatial_curriculum=True): higher LRs, as its "LLM"
# is minutes old and a stage a few hundred steps; pretrain gets ~a quarter of its time, midtrain ~1,400 steps to find
# objects by shape and list them in order (EXPERIMENTS.md, sections 'Earlier findings' and 'The patch embedding frozen
# after pretrain, and twice the steps').
STAGES = {
    #          paper: (lr, min_lr_ratio, warm-up, iters)     toy: (lr, min_lr_ratio, warm-up, iters)
    #          scripts: (lr, min_lr_ratio, warm-up, iters,   row tokens, min_pixels, max_pixels)
    "llm":      dict(paper=None,                          toy=(3e-3, 0.1, 10, 400)),
    "pretrain": dict(paper=(8e-4, 0.05, 2000, 190000),    toy=(2e-3, 0.1, 10, 600),
                     scripts=(8e-4, 0.1, 1000, 200000,    16384, 256 * 256, 2048 * 2048)),
    "midtrain": dict(paper=(5e-5, 0.1, 1000, 50000),      toy=(2e-3, 0.1, 20, 1440),
                     scripts=(5e-5, 0.2, 0.03, 50000,     32768, 256 * 256, 4096 * 4096),
                     scripts_9b=(5e-5, 0.2, 200, 50000,   18432, 256 * 256, 4096 * 4096)),
    "sft":      dict(paper=(5e-5, 0.1, 100, 10000),       toy=(3e-4, 0.1, 5, 120),
                     scripts=(6e-5, 0.1, 0.03, 4500,      34816, 256 * 256, 4096 * 4096),
                     scripts_9b=(6e-5, 0.1, 200, 4500,    18432, 256 * 256, 4096 * 4096),
                     # 1e-3: after the spatial stage, sft must bring back the families its questions pushed
                     # out, and 3e-4 brings back less (EXPERIMENTS.md, section 'A spatial curriculum')
                     toy_curriculum=(1e-3, 0.1, 5, 120)),
    "spatial":  dict(paper=None,                          toy=(2e-3, 0.1, 20, 150)),  # --spatial_curriculum
}
ORDER = ["llm", "pretrain", "midtrain", "spatial", "sft"]
PAPER_ORDER = [s for s in ORDER if STAGES[s]["paper"]]  # full scale: llm and spatial are the toy's own


def recipe_row(cfg, stage):
    """The recipe's entry of a stage (STAGES): the toy's, the paper's, or the released scripts' (None: no recipe)."""
    row = STAGES[stage]
    if cfg.model == "toy":
        return row.get("toy_curriculum", row["toy"]) if cfg.spatial_curriculum else row["toy"]
    if cfg.recipe == "scripts":
        return row.get("scripts_9b", row.get("scripts")) if cfg.model == "neo-9b" else row.get("scripts")
    return row["paper"]


def stage_recipe(cfg, stage):
    """(lr, min_lr_ratio, warmup, iters) of a stage: the recipe, with the command line's overrides."""
    rec = recipe_row(cfg, stage)
    if rec is None and stage == "llm":
        raise ConfigError("the llm stage is the toy's stand-in for a pretrained Qwen3: use --model=toy, "
                          "or start from one with --stage=pretrain --init_from=/path/Qwen3")
    if rec is None:
        raise ConfigError(f"the {stage} stage is a toy-only curriculum step: use --model=toy, or one of "
                          f"{', '.join(PAPER_ORDER)} at full scale")
    lr, ratio, warm, iters = rec[:4]
    iters = cfg.max_iters or max(1, round(iters * cfg.iters_scale))
    if warm < 1:  # a fraction of this stage's steps (the scripts' --warmup_ratio)
        warm = math.ceil(warm * iters)
    return (cfg.learning_rate or lr, ratio if cfg.min_lr_ratio < 0 else cfg.min_lr_ratio,
            min(warm, iters // 5) if cfg.warmup_iters < 0 else cfg.warmup_iters, iters)


def stage_row(cfg, stage):
    """Tokens per packed row in a stage: --max_seq_len, or 0 there: the scripts' row of the stage."""
    return cfg.max_seq_len or recipe_row(cfg, stage)[4]


def stage_pixels(cfg, stage, mcfg):
    """(min_pixels, max_pixels) of one image in a stage: --min_pixels/--max_pixels, else the scripts' under
    --recipe=scripts, else the model's own (mcfg: the starting folder's or the preset's). ConfigError if min > max."""
    rec = recipe_row(cfg, stage) if cfg.recipe == "scripts" else None
    lo, hi = [flag if flag != -1 else rec[i] if rec else own
              for flag, own, i in ((cfg.min_pixels, mcfg.min_pixels, 5), (cfg.max_pixels, mcfg.max_pixels, 6))]
    if lo > hi:
        raise ConfigError(f"[{stage}] min_pixels {lo} is over max_pixels {hi} (the flags', else the recipe's, else "
                          f"the model's own): pass both --min_pixels and --max_pixels")
    return lo, hi


def vision_lr_scale(cfg, stage):
    """LR multiplier of the patch embedding in a stage: for the toy 0.1 in pretrain and 0 after it (the patch
    embedding that pretrain learnt stays as it is); 1 at full scale; --vision_lr_scale overrides both.
    Why 0.1 in pretrain: ShapesWorld's few flat colours push the patch conv the same way step after step, and Adam
    moves each weight by ~lr a step: at 1x the visual tokens' norm grows to hundreds while text embeddings sit near
    1, and every layer's RMSNorm sees only raw patch features (EXPERIMENTS.md, section 'Earlier findings'). Natural
    images need no factor. Why 0 after it (a toy deviation: the paper trains everything in mid-training): while the
    patch embedding moves, the model does not finish learning to find an object by its shape (EXPERIMENTS.md,
    section 'The patch embedding frozen after pretrain, and twice the steps')."""
    if cfg.vision_lr_scale >= 0:
        return cfg.vision_lr_scale
    if cfg.model != "toy":
        return 1.0
    return 0.1 if stage == "pretrain" else 0.0


def configure_optimizers(model, weight_decay, learning_rate, betas, vision_lr_scale=1.0):
    """AdamW over the trainable parameters; no weight decay on norms and biases (1-D tensors). The patch
    embedding's groups carry lr_scale: the loop multiplies the scheduled LR by it (see vision_lr_scale)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n.startswith("vision.") == vision and (p.dim() >= 2) == decay],
               "weight_decay": weight_decay if decay else 0.0, "lr_scale": vision_lr_scale if vision else 1.0}
              for vision in (False, True) for decay in (True, False)]
    fused = all(p.is_cuda for _, p in named)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, fused=fused)


def get_lr(step, lr, ratio, warmup, iters):
    """Linear warm-up, then cosine from lr down to lr * ratio at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, iters - warmup))
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# -----------------------------------------------------------------------------
# One stage: set up, the loop, finish


@dataclass
class Run:
    """What the run carries from stage to stage."""
    last_stage: str               # the stage after which the run ends (blind evaluation, final/)
    peak: float                   # FLOP/s per process that MFU is measured against
    cores: CoreShare = None       # the thread count follows the free cores (a CPU without --threads), else None
    history: list = field(default_factory=list)  # (stage, global step, loss) of every step so far
    evals: list = field(default_factory=list)    # eval.json's entries, one per evaluated stage
    step0: int = 0                # global steps of the stages before this one
    saved: tuple = None           # (stage, step) ckpt.pt holds: the state a NaN stop sends the user back to
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Stage:
    """What a stage's setup hands to its loop and its finish."""
    name: str
    init: str                # the folder it started from ('' = scratch)
    tok: str                 # the tokenizer's name or folder, saved with the weights
    enc: object
    model: torch.nn.Module   # what the loop calls: DDP-wrapped under torchrun
    raw_model: NEO           # the model itself (sharded under FSDP): optimizer, checkpoints, evaluation
    opt: torch.optim.Optimizer
    loader: data.PackedLoader
    batches: object          # iter(loader)
    ctx: object              # autocast, or nothing in float32
    train_ctx: object        # ctx, or nothing under FSDP (its policy casts)
    sync: object             # sync(last micro-step): DDP/FSDP reduce the gradients only then (None: one process)
    schedule: tuple          # (lr, min_lr_ratio, warmup, iters): get_lr's arguments
    accum: int               # micro-steps per optimizer step on this process
    step: int                # optimizer steps done
    start: int               # the step this process began at (resumed: the step ckpt.pt already holds)
    flops_per_token: float   # of training, at the stage's row length: the MFU's numerator per token
    t0: float = 0.0          # when the loop started
    bar: object = None       # the loop's progress bar


def setup_stage(cfg, stage, init, procs, resume):
    """The model (from `init`, or from the checkpoint being resumed), its optimizer, wrappers and data."""
    device = procs.device
    ctx = autocast(cfg.dtype, "cuda" if "cuda" in device else "cpu")
    lr, ratio, warmup, iters = stage_recipe(cfg, stage)
    tok = resolve_tokenizer(cfg, init) if resume is None else resume["tokenizer"]
    enc = tokenizer.get_tokenizer(tok)
    if resume is not None:
        model = NEO(NEOConfig(**resume["model_config"]))
        model.load_state_dict(resume["model"])
    else:
        model = load_stage_model(cfg, stage, init)
    row = stage_row(cfg, stage)
    model.cfg.max_seq_len = max(model.cfg.max_seq_len, row)
    # the stage's image budget lives in the model's config: the loader, config.json, sample.py and eval read it there
    model.cfg.min_pixels, model.cfg.max_pixels = stage_pixels(cfg, stage, model.cfg)
    set_trainable(model, stage)
    model.grad_checkpointing = cfg.grad_checkpointing
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"[{stage}] {model.num_params() / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; from "
           f"{'ckpt.pt (resume)' if resume else init or 'scratch'}; lr {lr:g} -> {lr * ratio:g}, "
           f"warm-up {warmup}, {iters} steps; rows of {row} tokens, "
           f"{model.cfg.min_pixels:,}-{model.cfg.max_pixels:,} px per image")
    raw_model, train_ctx, sync = model, ctx, None
    if cfg.fsdp:
        shard(raw_model, getattr(torch, cfg.dtype))
        train_ctx = nullcontext()  # (evaluation, on the gathered copy, still autocasts with ctx)
        sync = raw_model.set_requires_gradient_sync
    # after fully_shard, so that under FSDP the optimizer holds the sharded DTensors
    opt = configure_optimizers(raw_model, cfg.weight_decay, lr, (cfg.beta1, cfg.beta2),
                               vision_lr_scale(cfg, stage))
    if resume is not None:
        checkpoint.load_full_state(raw_model, opt, resume["model"], resume["optimizer"], cfg.fsdp)
    if cfg.compile:
        compile_layers(raw_model)
    if procs.ddp and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # find_unused_parameters: a micro-batch without images leaves the patch embedding without a grad
        model = DDP(model, device_ids=[procs.local_rank] if "cuda" in device else None, find_unused_parameters=True)
        sync = lambda last: setattr(model, "require_backward_grad_sync", last)  # read in forward: set before it

    # data: each process reads its own shard; grad_accum counts micro-steps over all processes
    if cfg.grad_accum % procs.world:
        raise ConfigError(f"--grad_accum={cfg.grad_accum} (micro-steps per update, over all ranks) must be a "
                          f"multiple of the world size {procs.world}: e.g. --grad_accum={procs.world * cfg.grad_accum}")
    # each stage its own data seed, by its place in STAGES (spatial, optional, is last there: it moves no other's)
    loader = make_loader(cfg, stage, enc, raw_model.cfg, procs.rank, procs.world, cfg.seed + list(STAGES).index(stage))
    if resume is not None:
        loader.load_state_dict(resume["data_state"])
        checkpoint.set_rng_state(resume["rng"][procs.rank])
    step = resume["step"] if resume is not None else 0
    return Stage(name=stage, init=init, tok=tok, enc=enc, model=model, raw_model=raw_model, opt=opt, loader=loader,
                 batches=iter(loader), ctx=ctx, train_ctx=train_ctx, sync=sync, schedule=(lr, ratio, warmup, iters),
                 accum=cfg.grad_accum // procs.world, step=step, start=step,
                 flops_per_token=raw_model.flops_per_token(row))


def train_step(model, opt, next_batch, ctx, grad_clip, accum=1, sync=None, world=1, before_update=None):
    """One optimizer step, as the loop, the --dtype=auto probe and the bench take it: forward and backward on
    `accum` micro-batches (next_batch() draws each in its turn), the gradient norm clipped, then the update.
    world > 1: the loss and norm reported are the mean over the processes. before_update(loss, norm) runs between
    the backward and the update (the loop's NaN guard and checkpoint). -> (loss, grad norm, tokens this process
    trained on)."""
    loss_sum, n_tok = 0, 0
    for micro in range(accum):
        batch = next_batch()
        n_tok += int((batch["doc_ids"] >= 0).sum())
        if sync:  # reduce the gradients over the processes only on the last micro-step
            sync(micro == accum - 1)
        with ctx:
            _, loss = model(batch["input_ids"], batch["images"], batch["targets"], batch["doc_ids"],
                            batch["loss_weights"])
        # each micro-batch loss is a mean, so divide to make the sum over micro-steps their mean
        (loss / accum).backward()
        loss_sum = loss_sum + loss.detach()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor
        norm = norm.full_tensor()
    stats = torch.stack((loss_sum / accum, norm.float().to(loss_sum.device)))
    if world > 1:
        dist.all_reduce(stats)
        stats /= world
    loss_f, norm_f = stats.tolist()  # one CPU-GPU sync per step: the NaN guard must see every step
    if before_update:
        before_update(loss_f, norm_f)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_f, norm_f, n_tok


def train_loop(cfg, st, procs, run):
    """The optimizer steps of one stage, from st.step to the recipe's last."""
    iters = st.schedule[3]
    st.model.train()
    st.bar = tqdm(total=iters, initial=st.step, desc=st.name, disable=procs.rank != 0, dynamic_ncols=True)
    t_log, tok_log, st.t0 = time.perf_counter(), 0, time.perf_counter()
    while st.step < iters:
        # a checkpoint due at this step is written once this step's loss has shown its weights are finite (before
        # the update): saved right after an update instead, it could hold weights that give NaN at the next step
        due = st.step % cfg.eval_interval == 0 and st.step not in (0, st.start)
        before = (st.loader.state_dict(), checkpoint.rng_state()) if due else None
        lr = get_lr(st.step, *st.schedule)
        for g in st.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

        def vouch(loss, norm):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                stop(cfg, st, run, f"loss {loss}, grad norm {norm}: not finite, so training stopped before this "
                                   f"update")
            if due:
                save_checkpoint(cfg, st, procs, run, *before)
        loss, norm, n_tok = train_step(st.model, st.opt, lambda: data.to_device(next(st.batches), procs.device),
                                       st.train_ctx, cfg.grad_clip, st.accum, st.sync, procs.world, vouch)
        st.step += 1
        run.history.append((st.name, run.step0 + st.step, loss))
        tok_log += n_tok * procs.world
        st.bar.update(1)
        if st.step % cfg.log_interval == 0 or st.step == iters:  # loss, LR, gradient norm, tokens/s, MFU, ETA
            tok_per_s = tok_log / (time.perf_counter() - t_log)
            mfu = tok_per_s * st.flops_per_token / (run.peak * procs.world)
            eta = (time.perf_counter() - st.t0) / (st.step - st.start) * (iters - st.step)
            st.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)
            if procs.rank == 0:
                st.bar.write(f"[{st.name}] step {st.step}/{iters} loss {loss:.4f} lr {lr:.2e} norm {norm:.2f} "
                             f"{tok_per_s:,.0f} tok/s MFU {100 * mfu:.1f}% ETA {eta / 60:.1f} min")
            if run.cores and (n := run.cores.update()):
                st.bar.write(f"[{st.name}] other processes use {run.cores.others:.1f} cores: training on {n} "
                             f"thread{'s' if n > 1 else ''} (CoreShare)")
            t_log, tok_log = time.perf_counter(), 0
        if cfg.kill_at and run.step0 + st.step == cfg.kill_at:  # the resume tests: stop dead, as a crash would:
            st.bar.close(), print0(f"--kill_at={cfg.kill_at}: stopping dead (testing resume)")  # no cleanup
            os._exit(0)


def finish_stage(cfg, st, procs, run):
    """Vouch for the last update and checkpoint it, report skipped samples and divergence, save the stage's
    weights in the authors' layout and evaluate them; -> that folder."""
    # the last update has no next step to vouch for it: one forward on the next batch does, before it is saved
    before = (st.loader.state_dict(), checkpoint.rng_state())
    b = data.to_device(next(st.batches), procs.device)
    with torch.no_grad(), st.train_ctx, torch.compiler.set_stance("force_eager"):
        _, loss = st.raw_model(b["input_ids"], b["images"], b["targets"], b["doc_ids"], b["loss_weights"])
    loss = loss.detach().float()
    if procs.ddp:
        dist.all_reduce(loss)
    if not math.isfinite(loss.item()):
        stop(cfg, st, run, f"the last update gives loss {loss.item()}: not finite, so it was not saved")
    save_checkpoint(cfg, st, procs, run, *before)
    st.bar.close()
    stage, loader = st.name, st.loader
    if loader.skipped:  # why, per reason, with the first offenders: enough to find and fix them in the data
        print0(f"[{stage}] skipped {loader.skipped} samples:\n" + "\n".join("  " + l for l in loader.report()))
    if d := diverged([h[2] for h in run.history if h[0] == stage]):
        print0(f"[{stage}] warning: the loss ended at {d[1]:.4g}, far above where it started ({d[0]:.4g}): the "
               f"run diverged; lower --learning_rate", file=sys.stderr)
    run.step0 += st.schedule[3]

    folder, raw_model = os.path.join(cfg.out_dir, stage), st.raw_model
    if cfg.fsdp:
        msd, _ = checkpoint.full_state(raw_model, st.opt, True)
        if procs.rank == 0:
            raw_model = NEO(raw_model.cfg)
            raw_model.load_state_dict(msd)
    if procs.rank == 0:
        checkpoint.save_stage_folder(raw_model, st.tok, folder, qwen3=stage == "llm")
        print0(f"[{stage}] saved {folder}/ ({time.perf_counter() - st.t0:.0f} s)")
        last = stage == run.last_stage
        if cfg.data == "shapes" and cfg.eval_samples > 0 and (cfg.eval_every_stage or last):
            raw_model.to(procs.device)  # (FSDP: the gathered copy above was built on the CPU)
            evaluate_stage(cfg, stage, raw_model, st.enc, procs.device, st.ctx, run, blind=cfg.blind and last)
    if procs.ddp:
        dist.barrier()
    return folder


def save_checkpoint(cfg, st, procs, run, data_state, rng):
    """Save the state as it was at the top of this step: weights and optimizer not yet updated, and the loader
    position and RNG state from before this step's batches were drawn (the caller kept them)."""
    msd, osd = checkpoint.full_state(st.raw_model, st.opt, cfg.fsdp)
    rngs = [rng]
    if procs.ddp:  # every process's RNG, so a resumed run continues each one's stream
        rngs = [None] * procs.world
        dist.all_gather_object(rngs, rng)
    if procs.rank == 0:
        checkpoint.atomic_save({
            "model": msd, "model_config": asdict(st.raw_model.cfg), "optimizer": osd, "stage": st.name,
            "step": st.step, "rng": rngs, "data_state": data_state, "train_config": asdict(cfg), "tokenizer": st.tok,
            "init": st.init or "", "history": run.history}, os.path.join(cfg.out_dir, "ckpt.pt"))
    run.saved = (st.name, st.step)


def stop(cfg, st, run, what):
    """Not finite: nothing of this step is applied or saved; the message names the checkpoint to go back to."""
    st.bar.close()
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    back = (f"{ckpt_path} holds {run.saved[0]} step {run.saved[1]}, the last state whose loss was finite: go back "
            f"to it with --resume=True and a lower --learning_rate" if run.saved else
            "This run saved no checkpoint yet: run the same command with a lower --learning_rate")
    raise TrainError(f"[{st.name}] step {st.step}: {what}. {back}")


def load_stage_model(cfg, stage, init):
    """The model a stage starts from:
    llm: scratch (a Qwen3-like LM, no Pre-Buffer); pretrain: a Qwen3 folder with K fresh Pre-Buffer layers
    in front, or a NEO folder; midtrain/sft: the previous stage's NEO folder or ckpt."""
    ov = model_overrides(cfg)
    if stage == "llm":
        if init:
            return NEO.from_pretrained(init, dtype=torch.float32, **{**ov, "n_pre_layers": 0})
        return NEO(NEOConfig.preset(cfg.model, **{**ov, "n_pre_layers": 0}))
    if not init:
        raise ConfigError(f"--stage={stage} needs a model to start from: --init_from=<folder> or a previous "
                          f"stage in {cfg.out_dir}")
    cfg_json = os.path.join(init, "config.json")
    is_qwen3 = os.path.isfile(cfg_json) and json.load(open(cfg_json)).get("model_type") == "qwen3"
    if is_qwen3:  # the LLM's sizes come from its config.json; we choose only what NEO adds to it
        ov = {k: v for k, v in ov.items() if k in ("n_pre_layers", "vision_dim", "rope", "mask", "rope_theta_hw")}
        ov.setdefault("n_pre_layers", PRESETS[cfg.model].get("n_pre_layers", NEOConfig.n_pre_layers))
    else:  # a trained NEO keeps its shape; only the switches may change
        ov = {k: v for k, v in ov.items() if k in ("rope", "mask")}
    return NEO.from_pretrained(init, dtype=torch.float32, **ov)  # float32 master weights; autocast does the rest


# -----------------------------------------------------------------------------
# Main: the stages in order


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nkeys (--key=value) and their toy defaults:\n" +
              "\n".join(f"  --{f.name}={getattr(TrainConfig, f.name)}" for f in fields(TrainConfig)))
        return None
    cfg = parse_config(argv)
    if cfg.bench:  # bench writes nothing
        return launch(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with checkpoint.out_dir_lock(cfg.out_dir) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        ck = None
        if cfg.resume:  # the run's own config: this command line may change only the keys in RESUME_SAFE
            path = os.path.join(cfg.out_dir, "ckpt.pt")
            if not os.path.isfile(path):
                raise ConfigError(f"--resume=True but {path} does not exist (no checkpoint written yet): run "
                                  f"without --resume=True, or pass the --out_dir that holds it")
            ck = checkpoint.read_checkpoint(path)
            cfg = parse_config(argv, saved={**ck["train_config"], "out_dir": cfg.out_dir})
        return launch(cfg, ck)


def launch(cfg, ck=None):
    """Set up processes, device and precision, then bench or train the stages (from ck: resume); -> the Run."""
    procs = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    choice = [resolve_dtype(cfg, procs.device) if procs.rank == 0 else None]
    if procs.ddp:  # every rank trains in rank 0's choice
        dist.broadcast_object_list(choice, src=0)
    cfg.dtype = choice[0]
    for seed in (torch.manual_seed, random.seed, np.random.seed):  # per-rank offset; DDP broadcasts rank 0's weights
        seed(cfg.seed + procs.rank)
    if "cuda" in procs.device:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg.compile = cfg.compile and compile_works(procs.device)
    if cfg.bench:
        import bench
        cfg.max_seq_len = stage_row(cfg, "midtrain")  # the bench times midtrain batches
        return bench.train_speed(cfg, procs)
    order = PAPER_ORDER if cfg.model != "toy" else [s for s in ORDER if s != "spatial" or cfg.spatial_curriculum]
    stages = order if cfg.stage == "all" else [cfg.stage]
    if cfg.stage == "all" and cfg.init_from:  # the LLM is given (a Qwen3 folder or a NEO): no toy llm stage
        stages = [s for s in stages if s != "llm"]
    peak = peak_flops(procs.device, cfg.dtype, 0.5)
    # on a CPU the thread count follows what other processes leave free (CoreShare), unless --threads is given
    cores = CoreShare(torch.get_num_threads()) if procs.device == "cpu" and not procs.ddp and not cfg.threads else None
    run = Run(last_stage=stages[-1], peak=peak, cores=cores)
    print0(f"device {procs.device}, world {procs.world}, dtype {cfg.dtype}, stages {' -> '.join(stages)}; "
           f"{'GPU' if 'cuda' in procs.device else 'measured CPU GEMM'} peak {peak / 1e12:.3g} TFLOP/s")
    init = cfg.init_from
    if ck is not None:
        if ck["stage"] not in stages:
            raise TrainError(f"{cfg.out_dir}/ckpt.pt holds stage {ck['stage']}, which this run "
                             f"({' -> '.join(stages)}) does not train; start again without --resume=True")
        stages = stages[stages.index(ck["stage"]):]
        run.history = [tuple(h) for h in ck["history"]]
        run.step0 = ck["history"][-1][1] - ck["step"] if ck["history"] else 0
        if os.path.exists(os.path.join(cfg.out_dir, "eval.json")):
            run.evals = json.load(open(os.path.join(cfg.out_dir, "eval.json"))).get("stages", [])
        run.saved, init = (ck["stage"], ck["step"]), ck["init"]
        print0(f"resuming {ck['stage']} at step {ck['step']}")
    for i, stage in enumerate(stages):
        if i > 0:  # each stage starts from the one before it
            init = os.path.join(cfg.out_dir, stages[i - 1])
        elif not init and stage != "llm":  # a single stage: from the previous stage's folder in out_dir
            seq = order if stage in order else ORDER  # (--stage=spatial alone: after midtrain)
            prev = os.path.join(cfg.out_dir, seq[seq.index(stage) - 1])
            init = prev if os.path.isdir(prev) else ""
        st = setup_stage(cfg, stage, init, procs, resume=ck if i == 0 else None)  # (ck: the stage resumed)
        train_loop(cfg, st, procs, run)
        folder = finish_stage(cfg, st, procs, run)
    if procs.rank == 0:
        final = os.path.join(cfg.out_dir, "final")
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(folder, final)
        with open(os.path.join(cfg.out_dir, "history.json"), "w") as f:
            json.dump(run.history, f)
        draw_loss_curve(run.history, os.path.join(cfg.out_dir, "loss.png"))
        print0(f"done in {(time.perf_counter() - run.t0) / 60:.1f} min: {final}/, "
               f"{os.path.join(cfg.out_dir, 'eval.json')}, {os.path.join(cfg.out_dir, 'loss.png')}")
    if procs.ddp:
        dist.destroy_process_group()
    return run


def resolve_dtype(cfg, device):
    """--dtype=auto: bfloat16 on a GPU; on a CPU whichever trains faster here, measured (bench.choose_cpu_dtype)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if "cuda" in device:
        return "bfloat16"
    if device != "cpu":  # mps: float32, the one dtype every op supports there
        return "float32"
    import bench
    return bench.choose_cpu_dtype(cfg)


def cli():
    """python train.py: what the user can fix (the errors caught below) ends in one line on stderr and exit code 2
    (the command line) or 1; anything else is a bug and keeps its traceback."""
    try:
        main()
    except (ConfigError, TrainError, checkpoint.CheckpointError, data.DataError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", 0), errno.EROFS,
                                                      errno.EACCES):
            raise
        for bar in list(getattr(tqdm, "_instances", [])):  # end an open progress bar's line first
            bar.close()
        # a loader worker's error arrives with its traceback in the text: its last line is the message
        msg = data.one_line(e) if isinstance(e, OSError) else str(e).strip().splitlines()[-1]
        print(f"train.py: {msg}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


# -----------------------------------------------------------------------------
# Data: a stage's tokenizer and batches (the evaluation: evaluate.py)


def resolve_tokenizer(cfg, init):
    """--tokenizer, else the one the starting folder (or the folder around a ckpt.pt) names, else the toy's."""
    folders = [d for d in (init, os.path.dirname(init)) if d]
    return cfg.tokenizer or next(filter(None, map(tokenizer.tokenizer_of, folders)), "shapes")


def make_loader(cfg, stage, enc, mcfg, rank, world, seed):
    """Packed batches for a stage: ShapesWorld's stage mixture, or a JSONL dataset (same for every stage), at the
    pixel budget in mcfg (setup_stage puts the stage's there)."""
    if cfg.data == "shapes":
        source = shapes.ShapesWorld(split="train", stage=stage, enc=enc, min_pixels=mcfg.min_pixels,
                                    max_pixels=mcfg.max_pixels, seed=seed,
                                    extra=extra_weights(cfg, stage), places=cfg.places)
    else:
        source = data.JSONLDataset(cfg.data, image_root=cfg.image_root, enc=enc, min_pixels=mcfg.min_pixels,
                                   max_pixels=mcfg.max_pixels, stage=stage)
    return data.PackedLoader(source, batch_size=cfg.batch_size, max_seq_len=stage_row(cfg, stage), rank=rank,
                             world_size=world, seed=seed, num_workers=cfg.num_workers)


def extra_weights(cfg, stage):
    """Weights added to a ShapesWorld stage mixture: the places', the spatial curriculum's, the probe families'."""
    extra = dict(shapes.PLACES.get(stage, {})) if cfg.places else {}
    extra.update(shapes.SPATIAL_CURRICULUM.get(stage, {}) if cfg.spatial_curriculum else {})
    if cfg.probe_weight > 0 and stage in ("midtrain", "sft"):
        extra.update({f: cfg.probe_weight for f in shapes.PROBE_FAMILIES})
    return extra or None


if __name__ == "__main__":
    cli()
