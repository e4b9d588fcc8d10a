"""
train.py's command line: an optional config file (plain Python assigning some keys), then --key=value overrides,
each value of its key's type, and every key checked before anything runs; anything wrong is a ConfigError, one
line. The keys, what they mean and their defaults are train.py's TrainConfig.

    python train.py my_config.py --learning_rate=1e-3
"""
import math
import os
import re

import torch

import data
from neo import NEOConfig, PRESETS


class ConfigError(ValueError):
    """A bad command line or config: one line on stderr, exit code 2."""


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
        if value.lower() not in ("true", "1", "yes", "false", "0", "no"):
            raise ConfigError(f"--{key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if kind in (int, float):  # an int may be written '1e4' (a whole number), not '1.5'
        try:
            f = float(value)
        except ValueError:
            f = None
        if f is None or (kind is int and not f.is_integer()):
            raise ConfigError(f"--{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        return kind(f)
    return value


def read_args(argv, defaults):
    """[config.py] --key=value ... -> {key: value} for the keys given, each of its default's type (defaults: every
    key's default); an unknown key is refused with the list of the valid ones."""
    pairs = []  # (key, value, where it was given)
    if argv and not argv[0].startswith("--"):  # a config file: plain Python assigning some keys
        import runpy
        path, argv = argv[0], argv[1:]
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} not found")
        pairs = [(k, v, f" in {path}") for k, v in runpy.run_path(path).items()
                 if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))]
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments look like --key=value, got {arg!r}; valid keys: {', '.join(defaults)}")
        pairs.append((*arg[2:].split("=", 1), ""))  # split once: values may contain '='
    for k, v, where in pairs:
        if k not in defaults:
            raise ConfigError(f"unknown key {k!r}{where}; valid keys: {', '.join(defaults)}")
    return {k: coerce(k, v, defaults[k]) for k, v, _ in pairs}


def check_config(cfg, stages, recipe):
    """Every key's range, the model's shape and the files named, before anything runs (ConfigError). stages: the
    recipe's stage names; recipe(cfg, stage) refuses a stage this model has no recipe for."""
    for k, v in vars(cfg).items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"--{k} must be a finite number, got {v}")
    at_least = lambda lo, *keys: [(k, getattr(cfg, k) >= lo, f">= {lo}") for k in keys]
    preset = lambda k: (k, getattr(cfg, k) == -1 or getattr(cfg, k) >= 1, ">= 1, or -1 (the preset's)")
    pixels = lambda k: (k, getattr(cfg, k) == -1 or 32 * 32 <= getattr(cfg, k) <= data.MAX_PIXELS,
                        f"in [1024, {data.MAX_PIXELS}] (32x32 to 4096x4096 px), or -1 (the model's own)")
    checks = [("model", cfg.model in PRESETS, "|".join(PRESETS)),
              ("stage", cfg.stage in [*stages, "all"], "|".join([*stages, "all"])),
              ("rope", cfg.rope in ("native", "1d"), "native|1d"),
              ("mask", cfg.mask in ("mixed", "causal"), "mixed|causal"),
              ("dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "auto|bfloat16|float32"),
              ("device", re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device), "auto|cpu|cuda|cuda:N|mps"),
              ("out_dir", cfg.out_dir.strip(), "a folder"),
              ("recipe", cfg.recipe in ("paper", "scripts"), "paper|scripts"),
              ("recipe", cfg.recipe == "paper" or cfg.model != "toy",
               "paper for the toy (scripts: the released full-scale scripts' recipe, for --model=neo-2b|neo-9b)"),
              ("max_seq_len", cfg.max_seq_len >= 16 or (cfg.max_seq_len == 0 and cfg.recipe == "scripts"),
               ">= 16 (0: the stage's row, with --recipe=scripts)"),
              *map(pixels, ("min_pixels", "max_pixels")),
              ("max_pixels", -1 in (cfg.min_pixels, cfg.max_pixels) or cfg.max_pixels >= cfg.min_pixels,
               f">= --min_pixels={cfg.min_pixels}"),
              *at_least(1, "batch_size", "grad_accum", "eval_interval", "log_interval", "eval_batch"),
              *at_least(0, "weight_decay", "num_workers", "eval_samples", "kill_at"),
              ("max_iters", cfg.max_iters >= 0, ">= 0 (0 = the stage's recipe)"),
              ("iters_scale", cfg.iters_scale > 0, "> 0"),
              ("learning_rate", cfg.learning_rate >= 0, ">= 0 (0 = the stage's recipe)"),
              ("min_lr_ratio", cfg.min_lr_ratio == -1 or 0 <= cfg.min_lr_ratio <= 1, "in [0, 1], or -1 (the recipe's)"),
              ("warmup_iters", cfg.warmup_iters >= -1, ">= 0, or -1 (the recipe's)"),
              ("vision_lr_scale", cfg.vision_lr_scale == -1 or cfg.vision_lr_scale >= 0, ">= 0, or -1 (the recipe's)"),
              ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
              ("grad_clip", cfg.grad_clip > 0, "> 0"),
              ("threads", cfg.threads >= 0, ">= 0 (0 = torch's default)"),
              ("seed", 0 <= cfg.seed < 2 ** 31, "in [0, 2^31)"),
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
        recipe(cfg, cfg.stage)  # a toy-only stage at full scale
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
