"""
Checkpoints in the authors' layout (VLMEvalKit/vlmeval/vlm/neo/to_hf/modeling_neo_chat.py): the name map between
our parameters and a released NEO or a Qwen3 checkpoint, config.json both ways, and strict, lean loading: the
model is built on the meta device (no random init), each tensor read, cast and assigned on its own, so loading
needs about the weights' size in memory; a Qwen3 becomes the Post-LLM, its new H/W parts set by init_hw_from_t.
neo.py's NEO.from_pretrained and save_pretrained call in here; the forward math is all in neo.py.
The last section is train.py's own: the resumable ckpt.pt (atomic writes, one run per out_dir, RNG state) and the
stage folders.

    model = NEO.from_pretrained("/path/NEO1_0-2B-SFT")                 # a released NEO folder, in its bf16
    model = NEO.from_pretrained("/path/NEO1_0-2B-SFT", dtype=torch.float32)  # float32 weights, as for training
    model = NEO.from_pretrained("/path/Qwen3-1.7B", n_pre_layers=12)   # a Qwen3 becomes the Post-LLM
    model.save_pretrained("my_neo")                                     # loadable by the authors' code
"""
import json
import os
import random
import re
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, fields

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import data
import tokenizer
from neo import HW_NAMES, NEO, PRESETS, NEOConfig


def ckpt_names(model, layout="neo"):
    """our parameter name -> its name in a released NEO checkpoint, or in a Qwen3 checkpoint (which
    holds only the Post-LLM's text weights). A tied lm_head is not stored (safetensors drops it)."""
    out, n_pre = {}, model.cfg.n_pre_layers
    for k in model.state_dict():
        m = re.match(r"(pre_buffer|post_llm)\.(\d+)\.(.*)", k)
        if k == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        if layout == "qwen3":
            if m and m[1] == "post_llm" and not any(f".{h}." in k for h in HW_NAMES):
                out[k] = f"model.layers.{m[2]}.{m[3]}"
            elif k in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
                out[k] = k if k == "lm_head.weight" else "model." + k
        elif m:  # one global layer index: the Pre-Buffer first, then the LLM's layers
            out[k] = f"language_model.model.layers.{int(m[2]) + (n_pre if m[1] == 'post_llm' else 0)}.{m[3]}"
        elif k.startswith("vision."):
            out[k] = "vision_model.embeddings." + k[len("vision."):]
        else:
            out[k] = ("language_model." if k == "lm_head.weight" else "language_model.model.") + k
    return out


def hf_state_dict(model, layout="neo"):
    sd = model.state_dict()
    return {name: sd[k].detach().cpu().contiguous() for k, name in ckpt_names(model, layout).items()}


def save_pretrained(model, out_dir, layout="neo"):
    """config.json + model.safetensors in the authors' layout, so their code could load our weights.
    layout="qwen3" writes the Post-LLM alone as a Qwen3 checkpoint: the toy 'llm' stage hands its LLM
    on this way, so pre-training starts exactly as at full scale, from a Qwen3 folder."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.cfg
    hf = to_hf_config(cfg) if layout == "neo" else {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_mlp,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "nano_neo": asdict(cfg)}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(hf_state_dict(model, layout), tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))  # atomic: never a half-written file


def load(path, dtype=None, **overrides):
    """Load (a) a released NEO folder, (b) a Qwen3 folder (it becomes the Post-LLM; n_pre_layers new
    Pre-Buffer layers go in front; H/W projections per init_hw_from_t), or (c) our ckpt.pt (a file, or a
    folder holding one), with parameters in `dtype` (None: the checkpoint's own). Strict: a missing,
    unexpected or mis-shaped tensor is an error naming it."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) \
            and os.path.exists(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if os.path.isfile(path):  # (c) our training checkpoint: tensors and plain containers only
        try:  # mmap: only the model's tensors are ever read, not the optimizer state saved beside them
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            cfg, tensors = NEOConfig(**{**ckpt["model_config"], **overrides}), ckpt["model"]
            header = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
        except Exception as e:
            raise ValueError(f"{path}: not a nano-NEO checkpoint ({type(e).__name__}: {e})") from None
        model = empty_model(cfg)
        return assign_strict(model, header, lambda k: tensors[k].clone(),  # own memory, not the mapped file
                             {k: k for k in model.state_dict()}, path, dtype)
    cfg, kind = read_config(path, **overrides)
    header, read = read_safetensors(path)
    model = empty_model(cfg)
    if kind == "neo":  # (a)
        return assign_strict(model, header, read, ckpt_names(model, "neo"), path, dtype)
    assign_strict(model, header, read, ckpt_names(model, "qwen3"), path, dtype)  # (b); the rest: init_weights
    init_hw_from_t(model)
    return model


@torch.no_grad()
def init_hw_from_t(model):
    """A Qwen3 turned Post-LLM as VLMTrainKit/neo/model/modeling_neo_qwen3.py does it: the LLM unchanged at step 0.
    q_proj_hw per head = the rows of q_proj for the highest-frequency rotary pairs ([0, D/4) and [D/2, 3D/4)),
    concatenated and repeated for H and W; k_proj_hw = 0, so H/W logits start at 0."""
    nh, D, d = model.cfg.n_head, model.cfg.head_dim, model.cfg.d_model
    for blk in model.post_llm:
        a = blk.self_attn
        q = a.q_proj.weight.view(nh, D, d)
        hi = torch.cat((q[:, :D // 4], q[:, D // 2:3 * D // 4]), dim=1)  # (nh, D/2, d)
        a.q_proj_hw.weight.copy_(torch.cat((hi, hi), dim=1).reshape(nh * D, d))
        a.k_proj_hw.weight.zero_()
        for n in ("q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w"):
            getattr(a, n).weight.fill_(1.0)


def read_config(path, **overrides):
    """-> (NEOConfig, kind) of a folder ('neo' or 'qwen3') or our ckpt.pt ('ckpt') without reading its
    weights (sample.py --dry_run needs the config alone)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) \
            and os.path.exists(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if os.path.isfile(path):
        try:  # mmap: the tensors are not read
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            return NEOConfig(**{**ckpt["model_config"], **overrides}), "ckpt"
        except Exception as e:
            raise ValueError(f"{path}: not a nano-NEO checkpoint ({type(e).__name__}: {e})") from None
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; pass a NEO or Qwen3 folder or a ckpt.pt")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "qwen3":  # image ids given: the tokenizer files need no second reading
        given = {"img_start_id", "img_context_id", "img_end_id"} <= set(overrides)
        return from_hf_config(hf, **{**({} if given else image_ids(hf, path)), **overrides}), "neo"
    # a Qwen3: sizes from its config; vision and NEO sizes from the preset of that LLM, or overrides
    base = hf.get("nano_neo") or PRESETS["neo-9b" if hf["hidden_size"] >= 4096 else
                                         "neo-2b" if hf["hidden_size"] >= 2048 else "toy"]
    return NEOConfig(**{**base, **dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_kv_head=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
        d_mlp=hf["intermediate_size"], rms_norm_eps=hf["rms_norm_eps"], rope_theta=hf["rope_theta"],
        tie_word_embeddings=hf.get("tie_word_embeddings", False)), **overrides}), "qwen3"


def image_ids(hf, path):
    """The <img>, <IMG_CONTEXT>, </img> ids as NEOConfig fields. The training kit's config.json holds them; the
    inference kit's (VLMEvalKit/vlmeval/vlm/neo/to_hf/configuration_neo_chat.py) does not: its chat() asks the
    tokenizer, and so do we when the folder has tokenizer files. When both say, the tokenizer wins, as there."""
    keys = {"img_start_id": "<img>", "img_context_id": "<IMG_CONTEXT>", "img_end_id": "</img>"}
    ids = {k: hf[f"{k[:-3]}_token_id"] for k in keys if f"{k[:-3]}_token_id" in hf}
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        added = tokenizer.read_vocab(path)[1]
        tok = {k: added[s][0] for k, s in keys.items() if s in added}
        if any(ids.get(k, v) != v for k, v in tok.items()):
            print(f"{path}: config.json and the tokenizer disagree on the image token ids (config {ids}, tokenizer "
                  f"{tok}); using the tokenizer's, as the authors' chat() does", file=sys.stderr)
        ids.update(tok)
    return ids


def empty_model(cfg):
    with torch.device("meta"):  # no random init and no memory: every tensor comes from the file or init_weights
        return NEO(cfg)


def to_hf_config(cfg):
    """NEOConfig -> config.json in the authors' layout (plus our own fields under 'nano_neo')."""
    return {
        "architectures": ["NEOChatModel"], "model_type": "neo_chat", "hidden_size": cfg.d_model,
        "img_start_token_id": cfg.img_start_id, "img_end_token_id": cfg.img_end_id,
        "img_context_token_id": cfg.img_context_id, "tie_word_embeddings": cfg.tie_word_embeddings,
        "llm_config": {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_mlp, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "num_hidden_layers": cfg.n_layer_total, "extra_num_layers": cfg.n_pre_layers,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_theta_hw": cfg.rope_theta_hw,
            "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "attention_bias": False,
            "tie_word_embeddings": cfg.tie_word_embeddings},
        "vision_config": {
            "model_type": "neo_vision", "hidden_size": cfg.vision_dim, "llm_hidden_size": cfg.d_model,
            "patch_size": cfg.patch_size, "downsample_ratio": 1.0 / cfg.downsample, "num_channels": 3,
            "rope_theta_vision": cfg.rope_theta_vision, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels},
        "nano_neo": {k: getattr(cfg, k) for k in ("rope", "mask", "max_seq_len")},
    }


def from_hf_config(hf, **overrides):
    """config.json of a released NEO (the training kit's format, or the inference kit's with `template`), or one
    we saved -> NEOConfig. The inference format has no image token ids: pass them in overrides (image_ids)."""
    one = lambda v: v[0] if isinstance(v, list) else v  # to_hf/configuration_neo_vit.py stores 1-tuples
    try:
        llm, vis = hf["llm_config"], hf["vision_config"]
        n_pre = llm.get("extra_num_layers", 0)
        kw = dict(
            vocab_size=llm["vocab_size"], d_model=llm["hidden_size"], n_layer=llm["num_hidden_layers"] - n_pre,
            n_pre_layers=n_pre, n_head=llm["num_attention_heads"], n_kv_head=llm["num_key_value_heads"],
            head_dim=llm.get("head_dim", llm["hidden_size"] // llm["num_attention_heads"]),
            d_mlp=llm["intermediate_size"], rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
            rope_theta=llm.get("rope_theta", 1e6), rope_theta_hw=llm.get("rope_theta_hw", 1e4),
            tie_word_embeddings=hf.get("tie_word_embeddings", llm.get("tie_word_embeddings", False)),
            patch_size=vis.get("patch_size", 16),
            # the chat model reads the top-level ratio (to_hf/modeling_neo_chat.py), the vision model its own
            downsample=round(1 / one(hf.get("downsample_ratio", vis.get("downsample_ratio", 0.5)))),
            vision_dim=vis["hidden_size"], rope_theta_vision=vis.get("rope_theta_vision", 1e4),
            min_pixels=vis.get("min_pixels", 64 * 64), max_pixels=vis.get("max_pixels", 2048 * 2048),
            img_start_id=hf.get("img_start_token_id"), img_context_id=hf.get("img_context_token_id"),
            # </img> is not in the authors' config.json; the tokenizer files hold it (image_ids reads them)
            img_end_id=hf.get("img_end_token_id"),
            max_seq_len=llm.get("max_position_embeddings", 8192),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks {e}: not a NEO config (need llm_config, vision_config)") from None
    kw.update(hf.get("nano_neo", {}))
    names = {f.name for f in fields(NEOConfig)}
    if bad := set(overrides) - names:
        raise ValueError(f"unknown config keys {sorted(bad)}; valid: {sorted(names)}")
    kw.update(overrides)
    if kw["img_start_id"] is None or kw["img_context_id"] is None:
        raise ValueError("config.json has no img_start_token_id / img_context_token_id and the folder no tokenizer "
                         "files (tokenizer.json or vocab.json) holding <img> and <IMG_CONTEXT>")
    if kw["img_end_id"] is None:
        kw["img_end_id"] = kw["img_start_id"] + 1
    return NEOConfig(**kw)


def read_safetensors(path):
    """-> header {name: (shape, dtype)} from the files' headers, and read(name) -> that tensor. Data is read
    only by read(): one read() call straight into the tensor's own memory, with no mapping of the file and no
    second copy, so loading costs about the file's size in memory (EXPERIMENTS.md, section 'Speed on a CPU without
    AMX')."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    header, where = {}, {}
    for fn in (os.path.join(path, fn) for fn in files):
        try:
            with safe_open(fn, framework="pt") as f:  # the library checks the header: offsets, sizes, dtypes
                names = list(f.keys())
            with open(fn, "rb") as f:  # the format: 8-byte little-endian length, JSON header, then the data
                n = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(n))
        except Exception as e:
            raise ValueError(f"{fn}: unreadable safetensors file ({e})") from None
        for k in names:
            start, end = meta[k]["data_offsets"]
            header[k] = (tuple(meta[k]["shape"]), DTYPES.get(meta[k]["dtype"], meta[k]["dtype"]))
            where[k] = (fn, 8 + n + start, end - start)

    def read(name):
        fn, offset, nbytes = where[name]
        out = torch.empty(header[name][0], dtype=header[name][1])
        buf = out.view(-1).view(torch.uint8).numpy()  # the tensor's bytes, written in place
        with open(fn, "rb") as f:
            f.seek(offset)
            if buf.nbytes != nbytes or f.readinto(buf) != nbytes:
                raise ValueError(f"{fn}: {name} is cut short or mis-sized; the file is damaged")
        return out
    return header, read


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def assign_strict(model, header, read, names, path, dtype=None):
    """Fill a meta-device model from a checkpoint: header (checkpoint name -> (shape, dtype)) is checked before
    any data is read, then read(name) gives each tensor, cast to dtype (None: the checkpoint's; float32 if it
    mixes dtypes) one at a time. names: our name -> checkpoint name. Every checkpoint tensor must be wanted,
    every wanted one present, float and of the right shape: no silent random init. Parameters the checkpoint
    does not hold (a Qwen3 folder's new parts) are initialised by init_weights."""
    missing = sorted(set(names.values()) - set(header))
    unexpected = sorted(set(header) - set(names.values()))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    own = model.state_dict()
    for k, name in names.items():
        shape, dt = header[name]
        if shape != tuple(own[k].shape):
            raise ValueError(f"{path}: {name} has shape {shape}, expected {tuple(own[k].shape)}")
        if not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise ValueError(f"{path}: {name} has dtype {dt}, expected a float")
    dts = {header[name][1] for name in names.values()}
    dtype = dtype or (dts.pop() if len(dts) == 1 else torch.float32)
    tied = model.cfg.tie_word_embeddings
    # largest first: a cast's one-tensor overhead then comes when little else is loaded (peak near the weights)
    sd = {k: read(names[k]).to(dtype) for k in sorted(names, key=lambda k: -own[k].numel())
          if not (tied and k == "lm_head.weight")}
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:  # assign gave embed_tokens a new Parameter; lm_head must be that same one again
        model.lm_head.weight = model.embed_tokens.weight
    fresh = [m for m in model.modules() if any(p.is_meta for p in m.parameters(recurse=False))]
    if fresh:  # a Qwen3 folder: the Pre-Buffer, the patch embedding and the H/W parts are new
        for m in fresh:
            m.to_empty(device="cpu", recurse=False).to(dtype)
        model.init_weights(fresh)
    return model


# -----------------------------------------------------------------------------
# Training checkpoints (train.py): out_dir/ckpt.pt holds everything needed to resume exactly, written atomically
# by one run per out_dir; each finished stage is also saved as a folder in the authors' layout.


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be written, read or locked, for a reason the user can act on (a full disk,
    a truncated file, an out_dir in use): train.py prints the message as one line and exits with code 1."""


def atomic_save(obj, path):
    """Write to a temporary file, fsync, then rename: a crash mid-write never leaves a broken ckpt.pt. (One
    writer per out_dir: out_dir_lock.) A full disk is a CheckpointError, and leaves the last ckpt.pt as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError) and "write" not in str(e):  # torch.save reports a failed write this way
            raise
        raise CheckpointError(f"cannot write {path} ({data.one_line(e)}); {path} still holds the previous "
                              f"checkpoint, if any: free some disk space (or pick another --out_dir) and "
                              f"--resume=True") from None


def read_checkpoint(path):
    """out_dir/ckpt.pt for --resume=True; a truncated or foreign file is an error saying so."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "optimizer", "stage", "step", "history", "train_config"} - set(ck)
    except Exception as e:  # truncated zip, pickle, wrong file: torch.load raises many kinds
        raise CheckpointError(f"{path} cannot be read ({data.one_line(e)}): it is truncated or not a train.py "
                              f"checkpoint; start again without --resume=True") from None
    if missing:
        raise CheckpointError(f"{path} is not a train.py training checkpoint (it lacks "
                              f"{', '.join(sorted(missing))}); start again without --resume=True")
    return ck


@contextmanager
def out_dir_lock(out_dir):
    """One run per out_dir: an exclusive flock on out_dir/lock, which holds the owner's pid. The kernel drops
    the lock when its process ends, however it ends (a crash, kill -9), so a pid left in the file by a dead run
    is a stale lock: taken over with a note. Where flock is missing (Windows) runs are not locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = os.path.join(out_dir, "lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            raise CheckpointError(f"{out_dir} is in use by another train.py (pid {owner}, {path}): wait for it "
                                  f"to end, stop it (kill {owner}), or pass another --out_dir") from None
        f.seek(0)
        if old := f.read().strip():
            print(f"{path}: pid {old} ended without releasing it (a crash or a kill); taking it over", flush=True)
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # empty: the last run ended cleanly; closing the file releases the lock


def full_state(model, opt, fsdp):
    """Model and optimizer state as plain full tensors (gathered from all ranks under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), opt.state_dict()


def load_full_state(model, opt, msd, osd, fsdp):
    """The inverse of full_state: full tensors back into the (sharded under FSDP) model and optimizer."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(msd)
        opt.load_state_dict(osd)


def rng_state():
    """Every generator a step draws from (torch, CUDA, numpy, Python), as tensors and lists: weights_only loads it."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(s):
    """The inverse of rng_state."""
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def save_stage_folder(model, tok_name, path, qwen3=False):
    """A finished stage as a folder the next stage, sample.py and the authors' code load: save_pretrained plus
    the tokenizer (its files copied, or the name of a built-in one in tokenizer.txt)."""
    model.save_pretrained(path, layout="qwen3" if qwen3 else "neo")
    if not os.path.isdir(tok_name):  # a named tokenizer ("shapes"): record the name; folders are copied
        with open(os.path.join(path, "tokenizer.txt"), "w") as f:
            f.write(tok_name + "\n")
    else:
        import shutil
        for fn in os.listdir(tok_name):
            if fn.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
                shutil.copy(os.path.join(tok_name, fn), path)
