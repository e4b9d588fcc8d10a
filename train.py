"""
Train NEO: the paper's stages (DESIGN.md §6), on a CPU for the toy or on many GPUs at full scale.
One flat file, read top to bottom: the config, each stage's recipe, one stage (setup, the training loop that every
stage runs through, finish), main; then data and evaluation, setup, bench and helpers. The design-choice
ablation (the paper's Table 3) is ablate.py.

    python train.py                                   # whole toy pipeline on ShapesWorld (~12-16 min on 2 cores)
    python train.py --stage=midtrain --max_iters=200  # one stage, starting from out/pretrain
    python train.py --iters_scale=4 --spatial_curriculum=True  # the long run: spatial relations too (~56 min)
    python train.py --resume=True                     # continue exactly where out/ckpt.pt stopped
    python train.py --bench=True                      # tokens/s and achieved FLOP/s / measured peak
    python train.py my_config.py --learning_rate=1e-3 # a config file first, then overrides
    torchrun --standalone --nproc_per_node=8 train.py --stage=pretrain --model=neo-2b \\
        --init_from=/path/Qwen3-1.7B-Base --data=ann.jsonl --image_root=/path/images
    torchrun --standalone --nproc_per_node=8 train.py --stage=midtrain --model=neo-9b --fsdp=True ...

Stages: llm (toy only: a text LM, the stand-in for a pretrained Qwen3) -> pretrain (patch embedding,
Pre-Buffer and the new H/W q/k parts learn; the LLM is frozen) -> midtrain (everything; the toy keeps its
patch embedding frozen) -> spatial (toy only, with --spatial_curriculum: yes/no spatial questions alone) -> sft
(the same as midtrain, conversations). `--stage=all` runs them in order, each from the previous one's folder.
"""
import errno
import json
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import shapes
from neo import NEO, NEOConfig, PRESETS, set_trainable


# -----------------------------------------------------------------------------
# Config: every key, with the toy's defaults. `python train.py --key=value` overrides any of them.


@dataclass
class TrainConfig:
    # what to train
    stage: str = "all"            # llm|pretrain|midtrain|spatial|sft|all (all = in that order, spatial only
    #                               with --spatial_curriculum; full scale runs pretrain|midtrain|sft)
    model: str = "toy"            # NEOConfig preset: toy|neo-2b|neo-9b
    init_from: str = ""           # '' = the previous stage's folder in out_dir (llm: scratch); else a Qwen3
    #                               folder, a released NEO folder, or one of ours (folder or ckpt.pt)
    out_dir: str = "out"
    # data
    data: str = "shapes"          # 'shapes' = the built-in ShapesWorld, else a LLaVA/NEO JSON/JSONL file
    image_root: str = ""          # folder the JSONL's image paths are relative to
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
    max_iters: int = 0            # optimizer steps per stage
    iters_scale: float = 1.0      # multiplies every stage's recipe steps (a longer toy run: --iters_scale=4)
    learning_rate: float = 0.0    # peak LR
    min_lr_ratio: float = -1.0    # cosine decays to learning_rate * min_lr_ratio
    warmup_iters: int = -1
    vision_lr_scale: float = -1.0 # LR multiplier of the patch embedding; -1 = toy 0.1 in pretrain, 0 after;
    #                               full scale 1 (why: see vision_lr_scale())
    spatial_curriculum: bool = False  # toy: teach spatial relations (top-to-bottom captions, the spatial
    #                               stage, more relation questions in sft; shapes.SPATIAL_CURRICULUM says why)
    places: bool = True           # toy: video_dir answers name the first and last cell, then the direction,
    #                               and pretrain adds captions with cells; False: one word (the ablation's;
    #                               shapes.PLACES says why)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95           # the released scripts' 0.95 (the paper says 0.999)
    grad_clip: float = 1.0
    batch_size: int = 8           # packed rows per micro-step per process. Toy: 8 rows learn more in the same time
    #                               than 16 or 4 (EXPERIMENTS.md, section 'Earlier findings')
    max_seq_len: int = 192        # tokens per packed row (ShapesWorld samples are 20-180 tokens; a row's
    #                               attention is dense, so longer rows cost more per token on a CPU)
    grad_accum: int = 1           # micro-steps per optimizer step, over all processes together
    # system
    device: str = "auto"          # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"           # auto|bfloat16|float32 autocast (weights stay float32); auto =
    #                               bfloat16 on a GPU; on a CPU the faster of the two, measured at start-up
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


class ConfigError(ValueError):
    """A bad command line or config: one line on stderr, exit code 2."""


class TrainError(RuntimeError):
    """A run that cannot go on for a reason the user can act on (a NaN, a locked out_dir, an unreadable
    checkpoint, a full disk): one line on stderr, exit code 1."""


# Keys a resumed run may change (--resume=True): where and how fast it runs, what it logs, evaluates and
# checkpoints, and the step size (the remedy after a NaN stop). Any other key that differs from the checkpoint's
# config is refused: it would silently make another run out of this one (another schedule, batch, data or model).
RESUME_SAFE = ("out_dir", "resume", "kill_at", "device", "dtype", "compile", "threads", "num_workers", "fsdp",
               "grad_checkpointing", "log_interval", "eval_interval", "eval_samples", "eval_batch", "blind",
               "eval_every_stage", "learning_rate", "grad_clip")


def coerce(key, value, default):
    """A string (command line) or Python value (config file) -> the type of the key's default."""
    kind = type(default)
    if not isinstance(value, str):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not kind:
            raise ConfigError(f"--{key} must be {kind.__name__}, got {value!r}")
        return value
    if kind is bool:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} must be true or false, got {value!r}")
    if kind is int:  # '1e4' is accepted when it is a whole number, '1.5' is not
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"--{key} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"--{key} must be an integer, got {value!r}")
        return int(f)
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"--{key} must be a number, got {value!r}") from None
    return value


def parse_config(argv, saved=None):
    """[config.py] --key=value ... -> TrainConfig, every key's range checked. saved: the config of the run being
    resumed (its checkpoint's train_config), the base instead of the defaults; a key given here that is not in
    RESUME_SAFE must keep its saved value. Raises ConfigError with one line saying what is wrong."""
    defaults = TrainConfig()
    valid = {f.name: getattr(defaults, f.name) for f in fields(TrainConfig)}
    given = {}
    if argv and not argv[0].startswith("--"):  # a config file: plain Python assigning some keys
        import runpy
        path, argv = argv[0], argv[1:]
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found")
        for k, v in runpy.run_path(path).items():
            if not k.startswith("_") and not callable(v) and not isinstance(v, type(os)):
                if k not in valid:
                    raise ConfigError(f"unknown key {k!r} in {path}; valid keys: {', '.join(valid)}")
                given[k] = coerce(k, v, valid[k])
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments look like --key=value, got {arg!r}; valid keys: {', '.join(valid)}")
        k, v = arg[2:].split("=", 1)  # split once: values may contain '='
        if k not in valid:
            raise ConfigError(f"unknown key {k!r}; valid keys: {', '.join(valid)}")
        given[k] = coerce(k, v, valid[k])
    if saved is not None:
        for k, v in given.items():
            if k not in RESUME_SAFE and k in saved and saved[k] != v:
                raise ConfigError(f"--{k}={v} differs from the run being resumed ({k}={saved[k]!r}); a resumed run "
                                  f"keeps its config, except {', '.join(RESUME_SAFE)}: drop --{k}, or start a new "
                                  f"run in another --out_dir")
        base = {**asdict(defaults), **{k: v for k, v in saved.items() if k in valid}, "kill_at": 0}
    else:
        model = given.get("model", defaults.model)
        if model not in PRESETS:
            raise ConfigError(f"--model must be one of {', '.join(PRESETS)}, got {model!r}")
        base = {**asdict(defaults), **(FULL_SCALE if model != "toy" else {})}
    cfg = TrainConfig(**{**base, **given})
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Every key's range, the model's shape and the files named, before anything runs (ConfigError)."""
    for f in fields(cfg):
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise ConfigError(f"--{f.name} must be a finite number, got {getattr(cfg, f.name)}")
    preset = lambda k: (k, getattr(cfg, k) == -1 or getattr(cfg, k) >= 1, ">= 1, or -1 (the preset's)")
    checks = [("model", cfg.model in PRESETS, "|".join(PRESETS)),
              ("stage", cfg.stage in ORDER + ["all"], "|".join(ORDER + ["all"])),
              ("rope", cfg.rope in ("native", "1d"), "native|1d"),
              ("mask", cfg.mask in ("mixed", "causal"), "mixed|causal"),
              ("dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "auto|bfloat16|float32"),
              ("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device), "auto|cpu|cuda|cuda:N|mps"),
              ("out_dir", cfg.out_dir.strip(), "a folder"),
              ("batch_size", cfg.batch_size >= 1, ">= 1"), ("grad_accum", cfg.grad_accum >= 1, ">= 1"),
              ("max_seq_len", cfg.max_seq_len >= 16, ">= 16"), ("eval_interval", cfg.eval_interval >= 1, ">= 1"),
              ("log_interval", cfg.log_interval >= 1, ">= 1"),
              ("max_iters", cfg.max_iters >= 0, ">= 0 (0 = the stage's recipe)"),
              ("iters_scale", cfg.iters_scale > 0, "> 0"),
              ("learning_rate", cfg.learning_rate >= 0, ">= 0 (0 = the stage's recipe)"),
              ("min_lr_ratio", cfg.min_lr_ratio == -1 or 0 <= cfg.min_lr_ratio <= 1, "in [0, 1], or -1 (the recipe's)"),
              ("warmup_iters", cfg.warmup_iters >= -1, ">= 0, or -1 (the recipe's)"),
              ("vision_lr_scale", cfg.vision_lr_scale == -1 or cfg.vision_lr_scale >= 0, ">= 0, or -1 (the recipe's)"),
              ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
              ("grad_clip", cfg.grad_clip > 0, "> 0"),
              ("threads", cfg.threads >= 0, ">= 0 (0 = torch's default)"),
              ("num_workers", cfg.num_workers >= 0, ">= 0"),
              ("seed", 0 <= cfg.seed < 2 ** 31, "in [0, 2^31)"),
              ("eval_samples", cfg.eval_samples >= 0, ">= 0"), ("eval_batch", cfg.eval_batch >= 1, ">= 1"),
              ("kill_at", cfg.kill_at >= 0, ">= 0"),
              ("rope_theta_hw", cfg.rope_theta_hw == -1 or cfg.rope_theta_hw > 0, "> 0, or -1 (the preset's)"),
              ("n_pre_layers", cfg.n_pre_layers >= -1, ">= 0, or -1 (the preset's)"),
              *map(preset, ("d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_mlp", "vision_dim")),
              ("spatial_curriculum", not cfg.spatial_curriculum or (cfg.model == "toy" and cfg.data == "shapes"),
               "False unless --model=toy --data=shapes (it is a ShapesWorld curriculum)"),
              ("probe_weight", cfg.probe_weight == 0 or (cfg.probe_weight > 0 and cfg.data == "shapes"),
               ">= 0, and 0 unless --data=shapes (they are ShapesWorld families)")]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"--{key} must be {what}, got {getattr(cfg, key)!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device} but torch sees no CUDA GPU here; use --device=auto or cpu")
    try:
        NEOConfig.preset(cfg.model, **model_overrides(cfg))
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"the model's shape does not hold together: {e}") from None
    if cfg.stage != "all":
        stage_recipe(cfg, cfg.stage)  # a toy-only stage at full scale
    if cfg.data != "shapes":
        try:
            data.JSONLDataset.parse_spec(cfg.data)
        except data.DataError as e:
            raise ConfigError(f"--data: {e}") from None
    for key, ok in (("image_root", not cfg.image_root or os.path.isdir(cfg.image_root)),
                    ("init_from", not cfg.init_from or os.path.exists(cfg.init_from)),
                    ("tokenizer", cfg.tokenizer in ("", "shapes", "bytes") or os.path.isdir(cfg.tokenizer))):
        if not ok:
            raise ConfigError(f"--{key}={getattr(cfg, key)} does not exist" +
                              (" (a folder, or 'shapes' or 'bytes')" if key == "tokenizer" else ""))


def model_overrides(cfg):
    """NEOConfig fields the command line sets (-1 = keep the preset's / the checkpoint's)."""
    out = {k: getattr(cfg, k) for k in ("d_model", "n_layer", "n_pre_layers", "n_head", "n_kv_head",
                                        "head_dim", "d_mlp", "vision_dim", "rope_theta_hw") if getattr(cfg, k) != -1}
    return {**out, "rope": cfg.rope, "mask": cfg.mask, "patch_rope": cfg.patch_rope}


# -----------------------------------------------------------------------------
# Recipe: each stage's learning rate, schedule and steps, and what trains at which rate


# Per-stage recipe. `paper`: DESIGN.md §6 (NEO: pretrain 8e-4 -> 0.05x, warm-up 2k of 190k steps;
# mid-train and SFT 5e-5 -> 0.1x; AdamW, wd 0.01, clip 1.0, cosine). `toy`: what the toy uses instead;
# `toy_curriculum`: the toy's with --spatial_curriculum=True, where it differs.
# The toy's LRs are higher because its "LLM" is a few minutes old and each stage is a few hundred steps,
# not a pretrained Qwen3 fine-tuned for 100k steps: at 5e-5 a 5M-parameter model barely moves.
# Pretrain gets about a quarter of the toy's time: its frozen-LLM caption steps are the cheapest way to teach
# per-object features (EXPERIMENTS.md, section 'Earlier findings'). Finding an object by its shape and listing
# 3-4 objects in order take ~1,400 midtrain steps with the patch embedding frozen (EXPERIMENTS.md, section
# 'The patch embedding frozen after pretrain, and twice the steps'); a short llm stage leaves some seeds with an
# LLM that pretrain cannot build on (EXPERIMENTS.md, section 'Earlier findings').
STAGES = {
    #          paper: (lr, min_lr_ratio, warm-up, iters)     toy: (lr, min_lr_ratio, warm-up, iters)
    "llm":      dict(paper=None,                          toy=(3e-3, 0.1, 10, 400)),
    "pretrain": dict(paper=(8e-4, 0.05, 2000, 190000),    toy=(2e-3, 0.1, 10, 600)),
    "midtrain": dict(paper=(5e-5, 0.1, 1000, 50000),      toy=(2e-3, 0.1, 20, 1440)),
    "sft":      dict(paper=(5e-5, 0.1, 100, 10000),       toy=(3e-4, 0.1, 5, 120),
                     # 1e-3: after the spatial stage, sft must bring back the families its questions pushed
                     # out, and 3e-4 brings back less (EXPERIMENTS.md, section 'A spatial curriculum')
                     toy_curriculum=(1e-3, 0.1, 5, 120)),
    "spatial":  dict(paper=None,                          toy=(2e-3, 0.1, 20, 150)),  # --spatial_curriculum
}
ORDER = ["llm", "pretrain", "midtrain", "spatial", "sft"]
PAPER_ORDER = [s for s in ORDER if STAGES[s]["paper"]]  # full scale: llm and spatial are the toy's own


def stage_recipe(cfg, stage):
    """(lr, min_lr_ratio, warmup, iters) of a stage: the recipe, with the command line's overrides."""
    rec = STAGES[stage]["toy" if cfg.model == "toy" else "paper"]
    if cfg.model == "toy" and cfg.spatial_curriculum:
        rec = STAGES[stage].get("toy_curriculum", rec)
    if rec is None and stage == "llm":
        raise ConfigError("the llm stage is the toy's stand-in for a pretrained Qwen3: use --model=toy, "
                          "or start from one with --stage=pretrain --init_from=/path/Qwen3")
    if rec is None:
        raise ConfigError(f"the {stage} stage is a toy-only curriculum step: use --model=toy, or one of "
                          f"{', '.join(PAPER_ORDER)} at full scale")
    lr, ratio, warm, iters = rec
    iters = cfg.max_iters or max(1, round(iters * cfg.iters_scale))
    return (cfg.learning_rate or lr, ratio if cfg.min_lr_ratio < 0 else cfg.min_lr_ratio,
            min(warm, iters // 5) if cfg.warmup_iters < 0 else cfg.warmup_iters, iters)


def vision_lr_scale(cfg, stage):
    """LR multiplier of the patch embedding in a stage: for the toy 0.1 in pretrain and 0 after it (the patch
    embedding that pretrain learnt stays as it is); 1 at full scale; --vision_lr_scale overrides both.
    Why 0.1 in pretrain: ShapesWorld's few flat colours push the patch conv the same way step after step, and Adam
    moves each weight by ~lr a step: at 1x the visual tokens' norm grows to hundreds while text embeddings sit
    near 1, and every layer's RMSNorm sees only raw patch features (EXPERIMENTS.md, section 'Earlier findings').
    Natural images need no factor.
    Why 0 after it (a toy deviation: the paper trains everything in mid-training): while the patch embedding moves,
    the model does not finish learning to find an object by its shape (EXPERIMENTS.md, section 'The patch
    embedding frozen after pretrain, and twice the steps')."""
    if cfg.vision_lr_scale >= 0:
        return cfg.vision_lr_scale
    if cfg.model != "toy":
        return 1.0
    return 0.1 if stage == "pretrain" else 0.0


def configure_optimizers(model, weight_decay, learning_rate, betas, vision_lr_scale=1.0, eps=1e-8):
    """AdamW over the trainable parameters; no weight decay on norms and biases (1-D tensors). The patch
    embedding's groups carry lr_scale: the loop multiplies the scheduled LR by it (see vision_lr_scale)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for is_vision in (False, True):
        ps = [p for n, p in named if n.startswith("vision.") == is_vision]
        scale = vision_lr_scale if is_vision else 1.0
        groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    groups = [g for g in groups if g["params"]]
    fused = all(p.is_cuda for _, p in named)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)


def get_lr(step, lr, ratio, warmup, iters):
    """Linear warm-up, then cosine from lr down to lr * ratio at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, iters - warmup))
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# -----------------------------------------------------------------------------
# One stage: setup, the loop, finish


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
    schedule: tuple          # (lr, min_lr_ratio, warmup, iters): get_lr's arguments
    accum: int               # micro-steps per optimizer step on this rank
    step: int                # optimizer steps done
    on_disk: int             # the step ckpt.pt already holds (-1: none of this stage)
    flops_per_token: float
    t0: float = 0.0          # when the loop started
    bar: object = None       # the loop's progress bar


def run_stage(cfg, stage, init, env, state):
    """Train one stage from `init`; returns the folder its final weights are in."""
    st = setup_stage(cfg, stage, init, env, state)
    train_loop(cfg, st, env, state)
    return finish_stage(cfg, st, env, state)


def setup_stage(cfg, stage, init, env, state):
    """The model (from `init`, or from the checkpoint being resumed), its optimizer, wrappers and data."""
    ddp, rank, local_rank, world, device = env
    device_type = "cuda" if "cuda" in device else "cpu"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    ctx = nullcontext() if cfg.dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)
    lr, ratio, warmup, iters = stage_recipe(cfg, stage)
    resume = state.pop("resume_ckpt", None)
    tok = resolve_tokenizer(cfg, init) if resume is None else resume["tokenizer"]
    enc = data.get_tokenizer(tok)
    if resume is not None:
        model = NEO(NEOConfig(**resume["model_config"]))
        model.load_state_dict(resume["model"])
    else:
        model = load_stage_model(cfg, stage, init)
    model.cfg.max_seq_len = max(model.cfg.max_seq_len, cfg.max_seq_len)
    set_trainable(model, stage)
    model.grad_checkpointing = cfg.grad_checkpointing
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"[{stage}] {model.num_params() / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; from "
           f"{'ckpt.pt (resume)' if resume else init or 'scratch'}; lr {lr:g} -> {lr * ratio:g}, "
           f"warm-up {warmup}, {iters} steps")
    raw_model, train_ctx = model, ctx
    if cfg.fsdp:
        shard(raw_model, ptdtype)
        train_ctx = nullcontext()  # (evaluation, on the gathered copy, still autocasts with ctx)
    # after fully_shard, so that under FSDP the optimizer holds the sharded DTensors
    opt = configure_optimizers(raw_model, cfg.weight_decay, lr, (cfg.beta1, cfg.beta2),
                               vision_lr_scale(cfg, stage))
    if resume is not None:
        checkpoint.load_full_state(raw_model, opt, resume["model"], resume["optimizer"], cfg.fsdp)
    if cfg.compile:
        compile_layers(raw_model)
    if ddp and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # find_unused_parameters: a micro-batch without images leaves the patch embedding without a grad
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None,
                    find_unused_parameters=True)

    # data: each rank reads its own shard; grad_accum counts micro-steps over all ranks
    if cfg.grad_accum % world:
        raise ConfigError(f"--grad_accum={cfg.grad_accum} (micro-steps per update, over all ranks) must be a "
                          f"multiple of the world size {world}: e.g. --grad_accum={world * cfg.grad_accum}")
    # each stage its own data seed, by its place in STAGES (the optional spatial stage is last there, so it moves
    # no other stage's seed)
    loader = make_loader(cfg, stage, enc, raw_model.cfg, rank, world, cfg.seed + list(STAGES).index(stage))
    step = 0
    if resume is not None:
        loader.load_state_dict(resume["data_state"])
        checkpoint.set_rng_state(resume["rng"][rank] if isinstance(resume["rng"], list) else resume["rng"])
        step = resume["step"]
    return Stage(name=stage, init=init, tok=tok, enc=enc, model=model, raw_model=raw_model, opt=opt, loader=loader,
                 batches=iter(loader), ctx=ctx, train_ctx=train_ctx, schedule=(lr, ratio, warmup, iters),
                 accum=cfg.grad_accum // world, step=step, on_disk=resume["step"] if resume is not None else -1,
                 flops_per_token=flops_per_token(raw_model, cfg.max_seq_len))


def train_loop(cfg, st, env, state):
    """The optimizer steps of one stage, from st.step to the recipe's last."""
    ddp, rank, _, world, device = env
    model, raw_model, opt, iters = st.model, st.raw_model, st.opt, st.schedule[3]
    model.train()
    st.bar = tqdm(total=iters, initial=st.step, desc=st.name, disable=rank != 0, dynamic_ncols=True)
    t_log, tok_log, st.t0 = time.perf_counter(), 0, time.perf_counter()
    while st.step < iters:
        # a checkpoint due at this step is written below, once this step's loss has shown its weights are finite:
        # saved right after an update instead, it could hold weights that give NaN at the next step
        due = st.step % cfg.eval_interval == 0 and st.step not in (0, st.on_disk)
        before = (st.loader.state_dict(), checkpoint.rng_state()) if due else None
        lr = get_lr(st.step, *st.schedule)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        loss_sum, n_tok = torch.zeros((), device=device), 0
        for micro in range(st.accum):
            batch = to_device(next(st.batches), device)
            n_tok += int((batch["doc_ids"] >= 0).sum())
            # sync gradients only on the last micro-step (set before forward: DDP reads it there)
            if ddp and not cfg.fsdp:
                model.require_backward_grad_sync = micro == st.accum - 1
            if cfg.fsdp:
                raw_model.set_requires_gradient_sync(micro == st.accum - 1)
            with st.train_ctx:
                _, loss = model(batch["input_ids"], batch["images"], batch["targets"], batch["doc_ids"],
                                batch["loss_weights"])
            # each micro-batch loss is a mean, so divide to make the sum over micro-steps their mean
            (loss / st.accum).backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_([p for p in raw_model.parameters() if p.requires_grad], cfg.grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor
            norm = norm.full_tensor()
        stats = torch.stack((loss_sum / st.accum, norm.float().to(device)))
        if ddp:
            dist.all_reduce(stats)
            stats /= world
        loss_f, norm_f = stats.tolist()  # one CPU-GPU sync per step: the NaN guard must see every step
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            stop(cfg, st, state, f"loss {loss_f}, grad norm {norm_f}: not finite, so training stopped before this "
                                 f"update")
        if due:
            save_checkpoint(cfg, st, env, state, *before)
        opt.step()
        opt.zero_grad(set_to_none=True)
        st.step += 1
        state["history"].append((st.name, state["step0"] + st.step, loss_f))
        tok_log += n_tok * world
        st.bar.update(1)
        if st.step % cfg.log_interval == 0 or st.step == iters:
            log_step(st, state, loss_f, norm_f, lr, tok_log / (time.perf_counter() - t_log), env)
            t_log, tok_log = time.perf_counter(), 0
        crash_if_asked(cfg, state["step0"] + st.step, st.bar)  # --kill_at (the resume tests): stop dead here


def finish_stage(cfg, st, env, state):
    """Vouch for the last update and checkpoint it, report skipped samples and divergence, save the stage's
    weights in the authors' layout and evaluate them; -> that folder."""
    ddp, rank, _, _, device = env
    # the last update has no next step to vouch for it: one forward on the next batch does, before it is saved
    before = (st.loader.state_dict(), checkpoint.rng_state())
    b = to_device(next(st.batches), device)
    with torch.no_grad(), st.train_ctx, torch.compiler.set_stance("force_eager"):
        _, loss = st.raw_model(b["input_ids"], b["images"], b["targets"], b["doc_ids"], b["loss_weights"])
    loss = loss.detach().float()
    if ddp:
        dist.all_reduce(loss)
    if not math.isfinite(loss.item()):
        stop(cfg, st, state, f"the last update gives loss {loss.item()}: not finite, so it was not saved")
    save_checkpoint(cfg, st, env, state, *before)
    st.bar.close()
    state.pop("resumed_at", None)
    stage, loader = st.name, st.loader
    if loader.skipped:  # why, per reason, with the first offenders: enough to find and fix them in the data
        print0(f"[{stage}] skipped {loader.skipped} samples:\n" + "\n".join("  " + l for l in loader.report()))
    if d := diverged([h[2] for h in state["history"] if h[0] == stage]):
        print0(f"[{stage}] warning: the loss ended at {d[1]:.4g}, far above where it started ({d[0]:.4g}): the "
               f"run diverged; lower --learning_rate", file=sys.stderr)
    state["step0"] += st.schedule[3]

    folder, raw_model = os.path.join(cfg.out_dir, stage), st.raw_model
    if cfg.fsdp:
        msd, _ = checkpoint.full_state(raw_model, st.opt, True)
        if rank == 0:
            raw_model = NEO(raw_model.cfg)
            raw_model.load_state_dict(msd)
    if rank == 0:
        checkpoint.save_stage_folder(raw_model, st.tok, folder, qwen3=stage == "llm")
        print0(f"[{stage}] saved {folder}/ ({time.perf_counter() - st.t0:.0f} s)")
        last = stage == state["last_stage"]
        if cfg.data == "shapes" and cfg.eval_samples > 0 and (cfg.eval_every_stage or last):
            raw_model.to(device)  # (FSDP: the gathered copy above was built on the CPU)
            evaluate_stage(cfg, stage, raw_model, st.enc, device, st.ctx, state, blind=cfg.blind and last)
    if ddp:
        dist.barrier()
    return folder


def save_checkpoint(cfg, st, env, state, data_state, rng):
    """Save the state as it was at the top of this step: weights and optimizer not yet updated, and the loader
    position and RNG state from before this step's batches were drawn (the caller kept them)."""
    ddp, rank, _, world, _ = env
    msd, osd = checkpoint.full_state(st.raw_model, st.opt, cfg.fsdp)
    rngs = [None] * world
    if ddp:  # every rank's RNG, so a resumed run continues each rank's stream
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if rank == 0:
        checkpoint.atomic_save({
            "model": msd, "model_config": asdict(st.raw_model.cfg), "optimizer": osd, "stage": st.name,
            "step": st.step, "rng": rngs, "data_state": data_state, "train_config": asdict(cfg), "tokenizer": st.tok,
            "init": st.init or "", "history": state["history"]}, os.path.join(cfg.out_dir, "ckpt.pt"))
    state["saved"] = (st.name, st.step)


def stop(cfg, st, state, what):
    """Not finite: nothing of this step is applied or saved; the message names the checkpoint to go back to."""
    st.bar.close()
    saved = state.get("saved")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    back = (f"{ckpt_path} holds {saved[0]} step {saved[1]}, the last state whose loss was finite: go back to "
            f"it with --resume=True and a lower --learning_rate" if saved else
            "This run saved no checkpoint yet: run the same command with a lower --learning_rate")
    raise TrainError(f"[{st.name}] step {st.step}: {what}. {back}")


def evaluate_stage(cfg, stage, model, enc, device, ctx, state, blind):
    """Held-out exact match after a stage (blind: also with noise for images), printed and added to eval.json."""
    t0 = time.perf_counter()
    # what each stage taught: llm the text family, pretrain captions; then every family
    families = {"llm": ["text"], "pretrain": ["caption", "text"]}.get(stage)
    if families is None and cfg.probe_weight > 0:
        families = list(shapes.FAMILIES) + list(shapes.PROBE_FAMILIES)
    if state["cores"]:
        state["cores"].update()
    acc = evaluate_or_warn(model, enc, cfg, device, ctx, families=families)
    entry = {"stage": stage, "accuracy": acc, "seconds": round(time.perf_counter() - state["t0"], 1),
             "eval_seconds": round(time.perf_counter() - t0, 1)}
    if blind:
        entry["blind_accuracy"] = evaluate_or_warn(model, enc, cfg, device, ctx, blind=True, families=families)
    state["evals"].append(entry)
    print0(f"[{stage}] held-out exact match: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    if "blind_accuracy" in entry:
        print0(f"[{stage}] blind (images = noise):  " +
               ", ".join(f"{k} {v:.0%}" for k, v in entry["blind_accuracy"].items()))
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({**entry, "stages": state["evals"]}, f, indent=2)


def load_stage_model(cfg, stage, init):
    """The model a stage starts from (DESIGN §5/§6 and the contract):
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
    if not os.path.exists(init):
        raise ConfigError(f"--init_from={init} does not exist")
    cfg_json = os.path.join(init, "config.json")
    is_qwen3 = os.path.isfile(cfg_json) and json.load(open(cfg_json)).get("model_type") == "qwen3"
    if is_qwen3:  # the LLM's sizes come from its config.json; we choose only what NEO adds to it
        ov = {k: v for k, v in ov.items() if k in ("n_pre_layers", "vision_dim", "rope", "mask", "rope_theta_hw")}
        ov.setdefault("n_pre_layers", PRESETS[cfg.model].get("n_pre_layers", NEOConfig.n_pre_layers))
    else:  # a trained NEO keeps its shape; only the switches may change
        ov = {k: v for k, v in ov.items() if k in ("rope", "mask")}
    return NEO.from_pretrained(init, dtype=torch.float32, **ov)  # float32 master weights; autocast does the rest


def diverged(losses, factor=2.0):
    """-> (the first loss, the mean of the last fifth) if that mean is over factor x the first loss, else None."""
    k = len(losses) // 5
    if k == 0:
        return None
    end = sum(losses[-k:]) / k
    return (losses[0], end) if end > factor * losses[0] else None


# -----------------------------------------------------------------------------
# Main: the stages in order


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nkeys (--key=value) and their toy defaults:")
        for f in fields(TrainConfig):
            print(f"  --{f.name}={getattr(TrainConfig, f.name)}")
        return None
    cfg = parse_config(argv)
    if cfg.bench:  # bench writes nothing
        return run(cfg, argv)
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
        return run(cfg, argv, ck)


def run(cfg, argv, ck=None):
    """Set up processes, device and precision, then bench or train the stages (from ck: resume)."""
    env = setup_distributed(cfg)
    ddp, rank, local_rank, world, device = env
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if ddp and cfg.dtype == "auto" and "cuda" not in device:  # every rank must train in rank 0's choice
        choice = [resolve_dtype(cfg, device) if rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        cfg.dtype = choice[0]
    else:
        cfg.dtype = resolve_dtype(cfg, device)
    torch.manual_seed(cfg.seed + rank)  # per-rank offset; DDP broadcasts rank 0's weights anyway
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    if "cuda" in device:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg.compile = cfg.compile and compile_works(device)
    if cfg.bench:
        return bench(cfg, env)
    os.makedirs(cfg.out_dir, exist_ok=True)
    order = PAPER_ORDER if cfg.model != "toy" else [s for s in ORDER if s != "spatial" or cfg.spatial_curriculum]
    stages = order if cfg.stage == "all" else [cfg.stage]
    if cfg.stage == "all" and cfg.init_from:  # the LLM is given (a Qwen3 folder or a NEO): no toy llm stage
        stages = [s for s in stages if s != "llm"]
    peak = (gpu_peak_flops(torch.cuda.get_device_name(device)) if "cuda" in device else
            measure_cpu_peak(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32, 0.5))
    # on a CPU the thread count follows what other processes leave free (CoreShare), unless --threads is given
    cores = CoreShare(torch.get_num_threads()) if device == "cpu" and not ddp and not cfg.threads else None
    state = {"history": [], "evals": [], "step0": 0, "peak": peak, "t0": time.perf_counter(),
             "last_stage": stages[-1], "cores": cores}
    print0(f"device {device}, world {world}, dtype {cfg.dtype}, stages {' -> '.join(stages)}; "
           f"{'GPU' if 'cuda' in device else 'measured CPU GEMM'} peak {peak / 1e12:.3g} TFLOP/s")
    init = cfg.init_from
    if ck is not None:
        if ck["stage"] not in stages:
            raise TrainError(f"{cfg.out_dir}/ckpt.pt holds stage {ck['stage']}, which this run "
                             f"({' -> '.join(stages)}) does not train; start again without --resume=True")
        stages = stages[stages.index(ck["stage"]):]
        state["history"] = [tuple(h) for h in ck["history"]]
        state["step0"] = ck["history"][-1][1] - ck["step"] if ck["history"] else 0
        state["resumed_at"] = ck["step"]
        if os.path.exists(os.path.join(cfg.out_dir, "eval.json")):
            state["evals"] = json.load(open(os.path.join(cfg.out_dir, "eval.json"))).get("stages", [])
        state["resume_ckpt"], state["saved"], init = ck, (ck["stage"], ck["step"]), ck["init"]
        print0(f"resuming {ck['stage']} at step {ck['step']}")
    for i, stage in enumerate(stages):
        if i > 0:  # each stage starts from the one before it
            init = os.path.join(cfg.out_dir, stages[i - 1])
        elif not init and stage != "llm":  # a single stage: from the previous stage's folder in out_dir
            seq = order if stage in order else ORDER  # (--stage=spatial alone: after midtrain)
            prev = os.path.join(cfg.out_dir, seq[seq.index(stage) - 1])
            init = prev if os.path.isdir(prev) else ""
        folder = run_stage(cfg, stage, init, env, state)
    if rank == 0:
        final = os.path.join(cfg.out_dir, "final")
        import shutil
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(folder, final)
        with open(os.path.join(cfg.out_dir, "history.json"), "w") as f:
            json.dump(state["history"], f)
        draw_loss_curve(state["history"], os.path.join(cfg.out_dir, "loss.png"))
        print0(f"done in {(time.perf_counter() - state['t0']) / 60:.1f} min: {final}/, "
               f"{os.path.join(cfg.out_dir, 'eval.json')}, {os.path.join(cfg.out_dir, 'loss.png')}")
    if ddp:
        dist.destroy_process_group()
    return state


def cli():
    """python train.py: what the user can fix (a bad command line, unusable data, a NaN, a locked out_dir, an
    unreadable checkpoint, a full disk) ends in one line on stderr and exit code 2 (the command line) or 1;
    anything else is a bug and keeps its traceback."""
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
# Data and evaluation


def resolve_tokenizer(cfg, init):
    if cfg.tokenizer:
        return cfg.tokenizer
    for d in (init, os.path.dirname(init) if init else ""):  # our stage folders carry tokenizer.txt
        if d and os.path.isfile(os.path.join(d, "tokenizer.txt")):
            return open(os.path.join(d, "tokenizer.txt")).read().strip()
        if d and any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "vocab.json")):
            return d
    return "shapes"


def make_loader(cfg, stage, enc, mcfg, rank, world, seed):
    """Packed batches for a stage: ShapesWorld's stage mixture, or a JSONL dataset (same for every stage)."""
    if cfg.data == "shapes":
        source = shapes.ShapesWorld(split="train", stage=stage, enc=enc, min_pixels=mcfg.min_pixels,
                                    max_pixels=mcfg.max_pixels, seed=seed,
                                    extra=extra_weights(cfg, stage), places=cfg.places)
    else:
        source = data.JSONLDataset(cfg.data, image_root=cfg.image_root, enc=enc, min_pixels=mcfg.min_pixels,
                                   max_pixels=mcfg.max_pixels, stage=stage)
    return data.PackedLoader(source, batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, rank=rank,
                             world_size=world, seed=seed, num_workers=cfg.num_workers)


def extra_weights(cfg, stage):
    """Weights added to a ShapesWorld stage mixture: the places', the spatial curriculum's, the probe families'."""
    extra = dict(shapes.PLACES.get(stage, {})) if cfg.places else {}
    extra.update(shapes.SPATIAL_CURRICULUM.get(stage, {}) if cfg.spatial_curriculum else {})
    if cfg.probe_weight > 0 and stage in ("midtrain", "sft"):
        extra.update({f: cfg.probe_weight for f in shapes.PROBE_FAMILIES})
    return extra or None


def to_device(batch, device):
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["images"] = [im.to(device, non_blocking=True) for im in batch["images"]]
    return out


@torch.no_grad()
def evaluate(model, enc, cfg, device, ctx, blind=False, families=None):
    """Held-out exact match per task family: greedy generation with the KV cache, prompts of equal token
    length generated together. blind=True replaces every image with noise: the accuracy a model that
    cannot see gets (it should sit at each family's chance level)."""
    model.eval()
    ids = data.special_ids(enc)
    special = set(ids.values())
    prompts = shapes.ShapesWorld(split="val", enc=enc, min_pixels=model.cfg.min_pixels, max_pixels=model.cfg.max_pixels,
                                 places=cfg.places).eval_prompts(cfg.eval_samples, families=families)
    gen = torch.Generator().manual_seed(0)
    groups = {}
    for p in prompts:  # group by length: a batch of equal-length prompts needs no padding or mask change
        groups.setdefault(len(p["input_ids"]), []).append(p)
    preds = []
    bar = tqdm(total=len(prompts), desc="eval" + (" (blind)" if blind else ""), leave=False,
               disable=int(os.environ.get("RANK", 0)) != 0)
    for L, group in groups.items():
        for i in range(0, len(group), cfg.eval_batch):
            chunk = group[i:i + cfg.eval_batch]
            x = torch.tensor([p["input_ids"] for p in chunk], device=device)
            imgs = [im for p in chunk for im in p["images"]]
            if blind:
                imgs = [torch.randn(im.shape, generator=gen) for im in imgs]
            imgs = [im.to(device) for im in imgs]
            n_new = max(len(enc.encode(p["answer"])) for p in chunk) + 2
            with ctx, torch.compiler.set_stance("force_eager"):  # --compile=True: decode eagerly
                out = model.generate(x, imgs, max_new_tokens=n_new, eos_id=ids["im_end"], vocab_limit=enc.n_vocab)
            for p, row in zip(chunk, out.tolist()):
                row = row[:row.index(ids["im_end"])] if ids["im_end"] in row else row
                preds.append((p, enc.decode([t for t in row if t not in special and t < enc.n_vocab])))
            bar.update(len(chunk))
    bar.close()
    model.train()
    return shapes.score(preds)


def evaluate_or_warn(*args, **kw):
    """evaluate(), but a failure costs the accuracy, not the run: its traceback is shown and training goes on."""
    try:
        return evaluate(*args, **kw)
    except Exception:
        import traceback
        traceback.print_exc()
        print0("evaluation failed (traceback above, please report it); the stage's weights are saved, the run "
               "goes on", file=sys.stderr)
        return {}


# -----------------------------------------------------------------------------
# Setup: processes, device, precision, compilation


def setup_distributed(cfg):
    """nanoGPT-style: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them this is one process."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available() and cfg.device in ("auto", "cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
            dist.init_process_group("nccl")
        else:  # CPU: gloo (the tests run two CPU processes this way)
            device = "cpu"
            dist.init_process_group("gloo")
    else:
        rank, local_rank, world = 0, 0, 1
        device = cfg.device if cfg.device != "auto" else (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    return ddp, rank, local_rank, world, device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def resolve_dtype(cfg, device, measure=None):
    """--dtype=auto: bfloat16 on a GPU; on a CPU whichever trains faster here, measured (choose_cpu_dtype).
    No rule by CPU flag is right: bf16 was faster on CPUs with AVX512-BF16 or AMX and slower on one with neither
    (EXPERIMENTS.md, section 'Speed on a CPU without AMX'). `measure` (tests) replaces the measurement."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if "cuda" in device:
        return "bfloat16"
    if device != "cpu":  # mps: float32, the one dtype every op supports there
        return "float32"
    return (measure or choose_cpu_dtype)(cfg)


def choose_cpu_dtype(cfg, seconds=1.0):
    """Time the real work in each candidate dtype and return the faster: a few eager training steps of the
    configured toy model on ShapesWorld batches (a released-size model: a GEMM of its width instead), the
    candidates interleaved and each one's best round kept, so a burst of other work on the machine does not
    decide. Eager, not compiled: a cold compile takes a minute, and compiled runs kept the eager ranking on
    every CPU measured (EXPERIMENTS.md, section 'Speed on a CPU without AMX'). Prints both figures and the choice."""
    t0 = time.perf_counter()
    cands = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if cfg.model == "toy":
        enc = data.get_tokenizer("shapes")
        sp = data.special_ids(enc)
        mcfg = NEOConfig.preset(cfg.model, **model_overrides(cfg), img_start_id=sp["img_start"],
                                img_end_id=sp["img_end"], img_context_id=sp["img_context"])
        probe = TrainConfig(**{**asdict(cfg), "data": "shapes", "num_workers": 0})
        b = to_device(next(iter(make_loader(probe, "midtrain", enc, mcfg, 0, 1, 0))), "cpu")
        model = NEO(mcfg)
        set_trainable(model, "midtrain")
        opt = configure_optimizers(model, 0.0, 1e-6, (0.9, 0.95))
        amount, unit = b["input_ids"].numel(), "tok/s"   # tokens per call of work()

        def work(dt):
            with (nullcontext() if dt == torch.float32 else torch.autocast("cpu", dtype=dt)):
                _, loss = model(b["input_ids"], b["images"], b["targets"], b["doc_ids"], b["loss_weights"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        d = NEOConfig.preset(cfg.model).d_model
        x = {dt: torch.randn(512, d, dtype=dt) for dt in cands.values()}
        w = {dt: torch.randn(d, d, dtype=dt) for dt in cands.values()}
        amount, unit = 2 * 512 * d * d / 1e9, "GFLOP/s"

        def work(dt):
            x[dt] @ w[dt]
    best = {}
    for name, dt in cands.items():  # warm-up: first-call costs (kernel selection, allocations) off the clock
        work(dt)
    for _ in range(3):
        for name, dt in cands.items():
            t1, k = time.perf_counter(), 0
            while k == 0 or time.perf_counter() - t1 < seconds / 6:
                work(dt)
                k += 1
            best[name] = max(best.get(name, 0.0), k * amount / (time.perf_counter() - t1))
    choice = max(best, key=best.get)
    print0("dtype auto: " + ", ".join(f"{k} {v:,.0f} {unit}" for k, v in best.items()) +
           f" (eager, measured in {time.perf_counter() - t0:.1f} s) -> {choice}")
    return choice


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


def compile_works(device):
    """torch.compile needs a C++ compiler on a CPU (Triton on a GPU). Try it on a one-line function first, so
    a machine without one trains eagerly after a one-line note instead of failing at the first step."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
        return True
    except Exception as e:  # no compiler, an unsupported platform or Python: all mean "eager"
        first_line = str(e).partition("\n")[0][:120]
        print0(f"train.py: torch.compile does not work here ({type(e).__name__}: {first_line}); "
               f"training eagerly (pass --compile=False to skip this check)")
        return False


# -----------------------------------------------------------------------------
# Bench: tokens/s and achieved FLOP/s on the toy


def bench(cfg, env):
    _, _, _, _, device = env
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    ctx = nullcontext() if cfg.dtype == "float32" else torch.autocast(device.split(":")[0], dtype=ptdtype)
    enc = data.get_tokenizer(cfg.tokenizer or "shapes")  # random weights: only the shapes matter, so the toy
    sp = data.special_ids(enc)                            # data stands in for real data at any model size
    ids = dict(img_start_id=sp["img_start"], img_end_id=sp["img_end"], img_context_id=sp["img_context"])
    with torch.device(device):  # made on the device (NEO-2B: no 9 GB detour through the CPU)
        model = NEO(NEOConfig.preset(cfg.model, **model_overrides(cfg), **ids))
    model.cfg.max_seq_len = max(model.cfg.max_seq_len, cfg.max_seq_len)
    model.grad_checkpointing = cfg.grad_checkpointing
    set_trainable(model, "midtrain")
    opt = configure_optimizers(model, cfg.weight_decay, 1e-4, (cfg.beta1, cfg.beta2))
    it = iter(make_loader(cfg, "midtrain", enc, model.cfg, 0, 1, cfg.seed))
    batches = [to_device(next(it), device) for _ in range(4)]
    fill = sum(int((b["doc_ids"] >= 0).sum()) for b in batches) / sum(b["doc_ids"].numel() for b in batches)
    if cfg.compile:
        compile_layers(model)

    def train_step(b):
        with ctx:
            _, loss = model(b["input_ids"], b["images"], b["targets"], b["doc_ids"], b["loss_weights"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches:  # warm-up: every batch shape once (--compile=True compiles each here, not in the timing)
        train_step(b)
    if device == "cpu" and not cfg.threads:  # the thread count training would use now (CoreShare)
        cores = CoreShare(torch.get_num_threads())
        time.sleep(1.0)
        cores.update()
    n, t0 = 0, time.perf_counter()
    for k in range(8):
        train_step(batches[k % 4])
        n += batches[k % 4]["input_ids"].numel()
    if "cuda" in device:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = n / dt
    flops = tps * flops_per_token(model, cfg.max_seq_len)
    peak = (gpu_peak_flops(torch.cuda.get_device_name()) if "cuda" in device else measure_cpu_peak(
        torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32))
    gpu = "cuda" in device
    where = f"{torch.cuda.get_device_name()}" if gpu else f"{torch.get_num_threads()} threads"
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else ""
    print(f"bench: {model.num_params() / 1e6:.2f}M params, batch {cfg.batch_size}x{cfg.max_seq_len}, dtype "
          f"{cfg.dtype}{', compiled' if cfg.compile else ''}, {where}: {tps:,.0f} tok/s (rows {fill:.0%} filled), "
          f"{flops / 1e9:.1f} GFLOP/s achieved / {peak / 1e9:.1f} GFLOP/s {'bf16 data-sheet' if gpu else 'measured'} "
          f"peak = {100 * flops / peak:.1f}%{mem}")
    return tps, flops / peak



# -----------------------------------------------------------------------------
# Helpers: logging, the test hook, CPU threads, FLOPs and peaks, the loss plot


def log_step(st, state, loss, norm, lr, tok_per_s, env):
    """The loop's log line (loss, LR, gradient norm, tokens/s, MFU, ETA), and CoreShare's thread count."""
    rank, world, iters = env[1], env[3], st.schedule[3]
    mfu = tok_per_s * st.flops_per_token / (state["peak"] * world)
    eta = (time.perf_counter() - st.t0) / (st.step - state.get("resumed_at", 0)) * (iters - st.step)
    st.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)
    if rank == 0:
        st.bar.write(f"[{st.name}] step {st.step}/{iters} loss {loss:.4f} lr {lr:.2e} norm {norm:.2f} "
                     f"{tok_per_s:,.0f} tok/s MFU {100 * mfu:.1f}% ETA {eta / 60:.1f} min")
    if state["cores"] and (n := state["cores"].update()):
        st.bar.write(f"[{st.name}] other processes use {state['cores'].others:.1f} cores: training on {n} "
                     f"thread{'s' if n > 1 else ''} (CoreShare)")


def crash_if_asked(cfg, global_step, bar):
    """--kill_at=N (the resume tests): stop dead right after global step N, as a crash would: no cleanup, so only
    what is on disk survives."""
    if cfg.kill_at and global_step == cfg.kill_at:
        bar.close()
        print0(f"--kill_at={cfg.kill_at}: stopping dead (testing resume)")
        os._exit(0)


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


def measure_cpu_peak(dtype, seconds=1.0):
    """FLOP/s of a large matmul in `dtype` on this CPU: the ceiling MFU is measured against on a CPU."""
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def flops_per_token(model, seq_len):
    """Training FLOPs per token (fwd + bwd): 6 per weight in a matmul, plus attention: per layer and
    head 2*L*(2D) for q.k and 2*L*D for att.v forward, times 3 for fwd+bwd (PaLM App. B style)."""
    cfg = model.cfg
    n = model.num_params() - model.embed_tokens.weight.numel()
    if cfg.tie_word_embeddings:
        n += model.lm_head.weight.numel()  # the tied matrix is still a matmul at the head
    qk = 2 * cfg.head_dim if cfg.rope == "native" else cfg.head_dim
    return 6 * n + 3 * cfg.n_layer_total * cfg.n_head * 2 * seq_len * (qk + cfg.head_dim)


def gpu_peak_flops(name):
    """Dense bf16 peak by device name (vendor data sheets); inf when unknown, so MFU reads 0, not garbage."""
    table = [("H200", 989e12), ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40", 362e12),
             ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]
    return next((p for k, p in table if k in name), float("inf"))


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
    lo, hi = min(ys), max(ys)
    hi = max(hi, lo + 1e-3)
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


if __name__ == "__main__":
    cli()
