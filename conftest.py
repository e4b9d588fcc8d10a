"""
What the test files share: the tests' tiny model size, an image span, the inference kit's config format and
tokenizer.json, a small video file. Plain helpers, imported by name (from conftest import tiny_cfg), not fixtures:
they take arguments at each call and build module-level constants (test_train.py's flags), which a fixture cannot.
"""
import json
import os

import numpy as np
import pytest

import tokenizer
from neo import NEOConfig

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "neo_official_tiny")  # authors' tiny NEO
TINY_MODEL = dict(d_model=64, n_layer=2, n_pre_layers=1, n_head=4, n_kv_head=2, head_dim=16, d_mlp=128,
                  vision_dim=32)  # the tests' model size (.ci/gpu_checks.py uses it too)


def tiny_cfg(**kw):
    return NEOConfig.preset("toy", **{**TINY_MODEL, **kw})


def span(cfg, rows, cols):
    return [cfg.img_start_id] + [cfg.img_context_id] * (rows * cols) + [cfg.img_end_id]


def inference_config(hf, template="neo1_0"):
    """The fixture's config.json (the training kit's format) rewritten in the inference kit's
    (VLMEvalKit/vlmeval/vlm/neo/to_hf/configuration_neo_chat.py): template, top-level downsample_ratio, LoRA
    switches, the vision config's 1-tuples, and no image token ids."""
    out = {k: v for k, v in hf.items() if k not in ("img_start_token_id", "img_context_token_id")}
    out.update(template=template, downsample_ratio=0.5, use_backbone_lora=0, use_llm_lora=0)
    out["vision_config"] = {**hf["vision_config"], "downsample_ratio": [0.5],
                            "llm_hidden_size": [hf["vision_config"]["llm_hidden_size"]]}
    return out


def write_tokenizer_json(path, extra=()):
    """A tiny byte-level BPE in the released (Hugging Face) tokenizer.json format: 256 byte tokens in GPT-2's
    unicode alphabet, a few merges, and the added tokens at the ids of the fixture's config.json. extra: more
    added tokens, (content, special) each, from id 267."""
    b2u = tokenizer.bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    added = {"<img>": 256, "</img>": 257, "<IMG_CONTEXT>": 258, "<|endoftext|>": 259, "<|im_start|>": 260,
             "<|im_end|>": 261}
    special = {c: True for c in added}
    for i, (c, sp) in enumerate(extra):
        added[c], special[c] = 267 + i, sp
    for i, tok in enumerate(["th", "the", b2u[ord(" ")] + "the", "in", "ing"]):
        vocab[tok] = 262 + i
    vocab.update(added)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                   "added_tokens": [{"id": i, "content": c, "special": special[c]} for c, i in added.items()]}, f)


def write_video(path, n=20, fps=10, size=(64, 48), times=None, rotation=None, gop=None, bits=False):
    """A small video file written with PyAV (H.264 in .mp4/.mov, VP8 in .webm): a white 8x8 square on black
    moving 2 px right per frame (frame i: columns 2i..2i+7 of the top rows), or with bits=True the frame's number
    in binary, bit b white in columns 8b..8b+7. times: each frame's start in seconds (pts on a 1/1000 s clock;
    variable rate), else fps apart. No B-frames: the muxer keeps the times as given. gop: keyframe spacing."""
    av = pytest.importorskip("av", reason="reading and writing video files needs PyAV: pip install av")
    from fractions import Fraction
    W, H = size
    codec = "libvpx" if str(path).endswith(".webm") else "libx264"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps, options={"bf": "0"} if codec == "libx264" else {})
        s.width, s.height = W, H  # x264 codes odd sizes only without chroma subsampling
        s.pix_fmt = "yuv420p" if codec == "libvpx" or (W % 2 == 0 and H % 2 == 0) else "yuv444p"
        if times is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if gop:
            s.codec_context.gop_size = gop
        if rotation is not None:
            if not hasattr(s, "set_display_rotation"):
                pytest.skip(f"PyAV {av.__version__} cannot write a display matrix (PyAV 18 can)")
            s.set_display_rotation(rotation)  # the display matrix phones write
        for i in range(n):
            a = np.zeros((H, W, 3), np.uint8)
            for x in [8 * b for b in range(W // 8) if i >> b & 1] if bits else [2 * i]:
                a[:8, x:x + 8] = 255
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            if times is not None:
                f.pts, f.time_base = round(times[i] * 1000), Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode())
    return str(path)
