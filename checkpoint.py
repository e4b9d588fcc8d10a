"""
Checkpoints in the authors' layout (DESIGN.md §7): the name map between our parameters and a released NEO
or a Qwen3 checkpoint, config.json both ways, and strict safetensors loading. neo.py's NEO.from_pretrained
and save_pretrained call in here; nothing here is model math.

    model = NEO.from_pretrained("/path/NEO1_0-2B-SFT")                 # a released NEO folder
    model = NEO.from_pretrained("/path/Qwen3-1.7B", n_pre_layers=12)   # a Qwen3 becomes the Post-LLM
    model.save_pretrained("my_neo")                                     # loadable by the authors' code
"""
import json
import os
import re
from dataclasses import asdict, fields

import torch
from safetensors.torch import load_file, save_file

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


def load(path, **overrides):
    """Load (a) a released NEO folder, (b) a Qwen3 folder (it becomes the Post-LLM; n_pre_layers new
    Pre-Buffer layers go in front; H/W projections per DESIGN §5), or (c) our ckpt.pt (a file, or a
    folder holding one). Strict: a missing, unexpected or mis-shaped tensor is an error naming it."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")) \
            and os.path.exists(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if os.path.isfile(path):  # (c) our training checkpoint: tensors and plain containers only
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model, tensors = NEO(NEOConfig(**{**ckpt["model_config"], **overrides})), ckpt["model"]
        except Exception as e:
            raise ValueError(f"{path}: not a nano-NEO checkpoint ({type(e).__name__}: {e})") from None
        copy_strict(model, tensors, {k: k for k in model.state_dict()}, path)
        return model
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json; pass a NEO or Qwen3 folder or a ckpt.pt")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    tensors = read_safetensors(path)
    if hf.get("model_type") != "qwen3":  # (a)
        model = NEO(from_hf_config(hf, **overrides))
        copy_strict(model, tensors, ckpt_names(model, "neo"), path)
        return model
    # (b) sizes from the Qwen3 config; vision and NEO sizes from the preset of that LLM, or overrides
    base = hf.get("nano_neo") or PRESETS["neo-9b" if hf["hidden_size"] >= 4096 else
                                         "neo-2b" if hf["hidden_size"] >= 2048 else "toy"]
    model = NEO(NEOConfig(**{**base, **dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_kv_head=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]),
        d_mlp=hf["intermediate_size"], rms_norm_eps=hf["rms_norm_eps"], rope_theta=hf["rope_theta"],
        tie_word_embeddings=hf.get("tie_word_embeddings", False)), **overrides}))
    copy_strict(model, tensors, ckpt_names(model, "qwen3"), path)  # the rest keeps its fresh init
    model.init_hw_from_t()
    return model


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
    """config.json of a released NEO (or one we saved) -> NEOConfig."""
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
            patch_size=vis.get("patch_size", 16), downsample=round(1 / vis.get("downsample_ratio", 0.5)),
            vision_dim=vis["hidden_size"], rope_theta_vision=vis.get("rope_theta_vision", 1e4),
            min_pixels=vis.get("min_pixels", 64 * 64), max_pixels=vis.get("max_pixels", 2048 * 2048),
            img_start_id=hf["img_start_token_id"], img_context_id=hf["img_context_token_id"],
            # </img> is not in the authors' config.json; the tokenizer files hold it (data.py reads them)
            img_end_id=hf.get("img_end_token_id", hf["img_start_token_id"] + 1),
            max_seq_len=llm.get("max_position_embeddings", 8192),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks {e}: not a NEO config (need llm_config, vision_config, "
                         f"img_start_token_id, img_context_token_id)") from None
    kw.update(hf.get("nano_neo", {}))
    names = {f.name for f in fields(NEOConfig)}
    bad = set(overrides) - names
    if bad:
        raise ValueError(f"unknown config keys {sorted(bad)}; valid: {sorted(names)}")
    return NEOConfig(**{**kw, **overrides})


def read_safetensors(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for fn in files:
        try:
            out.update(load_file(os.path.join(path, fn)))
        except Exception as e:
            raise ValueError(f"{os.path.join(path, fn)}: unreadable safetensors file ({e})") from None
    return out


def copy_strict(model, tensors, names, path):
    """Copy checkpoint tensors into the model. names: our name -> checkpoint name. Every checkpoint tensor
    must be wanted, every wanted one present and of the right shape: no silent random init."""
    missing = sorted(set(names.values()) - set(tensors))
    unexpected = sorted(set(tensors) - set(names.values()))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the config: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    own = model.state_dict()
    with torch.no_grad():
        for k, name in names.items():
            if tuple(tensors[name].shape) != tuple(own[k].shape):
                raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(own[k].shape)}")
            own[k].copy_(tensors[name])
