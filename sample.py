r"""
Ask NEO about an image, several images or a video, and watch the answer stream out.

    python sample.py --image cat.jpg                                # the toy's out/final: a ShapesWorld-style caption
    python sample.py --image a.png --image b.png --prompt "Which image has more shapes, the first or the second?"
    python sample.py --video clip.mp4 --num_frames 8 --prompt "Which way does the shape move?"
    python sample.py --image cat.jpg --show_attention attn.png      # where the answer looked
    python sample.py --draw_mask mask.png                           # NEO's (t, h, w) indices and mask, drawn
    python sample.py --init_from /path/NEO1_0-2B-SFT --image cat.jpg --device cuda   # the authors' weights
    python sample.py --init_from /path/NEO1_0-2B-SFT --image cat.jpg --quantize=int8  # int8 weights (CPU)
    python sample.py --init_from /path/NEO1_5-2B-SFT --video clip.mp4 --dry_run   # the prompt, no weights needed

--init_from takes a released NEO folder (config.json, safetensors, tokenizer files), a folder train.py wrote
(out/final, out/sft, ...: config.json, model.safetensors, tokenizer.txt or tokenizer files) or a training
checkpoint (out/ckpt.pt). --preset sets the prompt, the pixel budgets and the decoding (INFERENCE below):
  neo1       NEO 1.0 as the authors evaluate it: no system turn, several images as "Image-1: <image>\n...", greedy
  neo-ov     NEO-ov images and video: "Reason step by step.", unnumbered images, timestamped frames, sampling
  neo-ov-si  NEO-ov's spatial setting: no system turn, 720x960 px per image, "Frame1 is at [00:00.50]:<image>"
  shapes     our toy's training format (shapes.ShapesWorld): no system turn, "<image>{question}", greedy
Default: shapes for our checkpoints; for a released folder its config's template (neo-ov for NEO1_5, else neo1).
The chat template is `<|im_start|>system\n{system}<|im_end|>\n` (left out when the system text is empty), then
`<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n`, each <image> becoming `<img>` +
(H/32)*(W/32) x `<IMG_CONTEXT>` + `</img>`. Generation stops at <|im_end|>.
"""
import argparse
import codecs
import json
import os
import sys
import zipfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import checkpoint
import data
import tokenizer
from common import choose_device, probe_cpu
from neo import NEO, KVCache, NEOConfig, build_attention_mask, build_positions
from quantize import quantize_int8

ATTN_LAYERS = 4  # --show_attention averages over the last this-many layers (all heads)
K = 32 * 32      # pixels of one visual token


# -----------------------------------------------------------------------------
# Inference settings: the authors' for their released models, and the toy's


# Inference as the authors evaluate their released models (github EvolvingLMMs-Lab/NEO, the files named below),
# and the toy's own. Pixel budgets (min, max) per image and per video frame; None: the model config's, as the toy
# trained. max_new_tokens is capped by the context. The layout of images and frames is build_messages'.
INFERENCE = {
    # NEO 1.0: VLMEvalKit/vlmeval/config.py (NEO-2B-SFT budgets), vlm/neo/neo_chat.py (system '', greedy, 4096
    # new tokens), vlm/neo/utils.py (reorganize_prompt; build_video_prompt turns numbered frames into Frame-k).
    # That kit has one budget per model, so video frames get the image budget.
    "neo1": dict(system="", image_pixels=(1280 * K, 4096 * K), frame_pixels=(1280 * K, 4096 * K),
                 temperature=0.0, top_p=None, top_k=None, repetition_penalty=1.0, max_new_tokens=4096),
    # NEO-ov (NEO1_5) images and video: VLMEvalKit_ov/vlmeval/config.py (NEOov-2B-image, NEOov-2B-video),
    # vlm/neo/neo_chat.py (system and sampling), vlm/neo/utils.py (reorganize_prompt), dataset/videomme.py
    # (frames at int(i*n/(k+1)), the time line, "[MM:SS.ss]:<image>" per frame)
    "neo-ov": dict(system="Reason step by step.", image_pixels=(1280 * K, 16384 * K), frame_pixels=(4 * K, 360 * 640),
                   temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.05, max_new_tokens=16384),
    # NEO-ov's spatial setting: config.py (NEOov-2B-si), vlm/neo_si/neo_chat.py (system '', greedy, 4096),
    # vlm/neo_si/utils.py (reorganize_prompt: numbered images, "Frame{i} is at [MM:SS.ss]:<image>" lines)
    "neo-ov-si": dict(system="", image_pixels=(720 * 960, 720 * 960), frame_pixels=(720 * 960, 720 * 960),
                      temperature=0.0, top_p=None, top_k=None, repetition_penalty=1.0, max_new_tokens=4096),
    # our toy (shapes.ShapesWorld): the config's budget per image, a quarter of it per video frame
    "shapes": dict(system="", image_pixels=None, frame_pixels=None,
                   temperature=0.0, top_p=None, top_k=None, repetition_penalty=1.0, max_new_tokens=256),
}
DECODING = ("system", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")  # flag = preset key


def choose_preset(name, ours, path):
    """--preset auto, as the docstring's Default says. NEO1_5's template name is not in the authors' repository:
    "1_5" in it or in the folder's name (NEO1_5-2B-SFT) means NEO-ov."""
    if name != "auto":
        return name
    if ours:
        return "shapes"
    with open(os.path.join(path, "config.json")) as f:
        said = str(json.load(f).get("template") or "") + " " + os.path.basename(os.path.normpath(path))
    return "neo-ov" if "1_5" in said else "neo1"


def settings(name, args, cfg):
    """The preset's settings with every flag given on the command line in their place; pixel budgets resolved."""
    s = dict(INFERENCE[name])
    if s["image_pixels"] is None:  # the toy's: the config's, a quarter of it per video frame
        hi = min(cfg.max_pixels, data.MAX_PIXELS)
        lo = min(cfg.min_pixels, hi)
        s["image_pixels"], s["frame_pixels"] = (lo, hi), (lo, cfg.max_pixels // 4)
    for key in ("image_pixels", "frame_pixels"):  # a flag sets both; a lower max takes the min down with it
        lo, hi = s[key]
        hi = args.max_pixels or hi
        lo = args.min_pixels or min(lo, hi)
        s[key] = (lo, hi if args.max_pixels else max(lo, hi))
    s.update({k: getattr(args, k) for k in DECODING if getattr(args, k) is not None})
    s["top_k"] = s["top_k"] if s["top_k"] and s["top_k"] > 0 else None
    s["top_p"] = s["top_p"] if s["top_p"] is not None and s["top_p"] < 1 else None
    for what, (lo, hi) in (("image", s["image_pixels"]), ("video frame", s["frame_pixels"])):
        if not K <= lo <= hi:
            raise SampleError(f"need 1024 <= --min_pixels ({lo}) <= --max_pixels ({hi}) per {what}")
    return s


def describe(name, s):
    """The one stderr line saying which settings are in force."""
    px = lambda b: f"{b[0]}-{b[1]} px ({b[0] // K}-{b[1] // K} tokens)"
    dec = "greedy" if s["temperature"] == 0 else f"sampling at temperature {s['temperature']}, top_p {s['top_p']}, " \
                                                 f"top_k {s['top_k']}"
    return (f"preset {name}: system {s['system']!r}; images {px(s['image_pixels'])}, video frames "
            f"{px(s['frame_pixels'])}; {dec}, repetition_penalty {s['repetition_penalty']}, max_new_tokens "
            f"{s['max_new_tokens']} (flags override each)")


# -----------------------------------------------------------------------------
# Command line


why = data.one_line  # an exception as one short line, in every error message below
MODELS = "a released NEO folder, a folder train.py wrote, or a ckpt.pt"  # what --init_from takes, in those messages


class SampleError(Exception):
    """Bad input: the message is printed as one line on stderr and the exit code is 1."""


def check_out_png(path, flag):
    """Refuse an output picture path that could not be written, before any work is done."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SampleError(f"{flag} {path}: the folder {folder} does not exist; create it or pick another path")
    if os.path.splitext(path)[1].lower() not in Image.registered_extensions():
        raise SampleError(f"{flag} {path}: not an image file name PIL can write; end it in .png")


def save_png(im, path):
    try:
        im.save(path)
    except (OSError, ValueError) as e:  # a full disk, no permission
        raise SampleError(f"cannot write {path} ({why(e)})") from None


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--video", nargs="+", help="video file (needs PyAV), frame folder, animated GIF/WebP or frame files")
    p.add_argument("--num_frames", type=int, default=8, help="frames sampled uniformly from --video (default 8); "
                                                             "with --video_fps, the most")
    p.add_argument("--video_fps", type=float, default=None,
                   help="sample this many frames per second instead, at most --num_frames (the authors' Video-MME: "
                        "--video_fps 1 --num_frames 256)")
    p.add_argument("--prompt", default=None, help="the question (default: asks for a description)")
    p.add_argument("--preset", default="auto", choices=["auto", *INFERENCE],
                   help="prompt layout, system turn, pixel budgets and decoding (default auto: see above)")
    p.add_argument("--system", default=None, help="system message (default: the preset's; '' = no system turn)")
    p.add_argument("--init_from", default=None, help="model folder or ckpt.pt (default: OUT_DIR/final)")
    p.add_argument("--out_dir", default="out", help="train.py's out_dir, where the default model is (default out)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the exact prompt (image spans written out) and exit; reads no weights")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the preset's, capped by the context")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the preset's)")
    p.add_argument("--top_k", type=int, default=None, help="sample from the k likeliest tokens only; 0 = all")
    p.add_argument("--top_p", type=float, default=None, help="sample within this much probability (nucleus); 1 = all")
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help="divide (multiply if < 0) the logit of every id seen so far, prompt included; 1 = off")
    p.add_argument("--seed", type=int, default=1337, help="for sampling (default 1337)")
    p.add_argument("--device", default="auto", help="auto (default)|cpu|cuda|cuda:N|mps")
    p.add_argument("--quantize", default="none", help="int8: weight-only int8 Linear layers, per output channel "
                   "(half bf16's bytes a token); none (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default auto: bfloat16 on a GPU; on a CPU whichever of float32 and bfloat16 runs faster here")
    p.add_argument("--min_pixels", type=int, default=None, help="per image and video frame (default: the preset's)")
    p.add_argument("--max_pixels", type=int, default=None, help="per image and video frame (default: the preset's)")
    p.add_argument("--draw_mask", default=None, metavar="OUT.png",
                   help="draw the (t, h, w) indices and the mixed mask of an example sequence to OUT.png, then exit")
    p.add_argument("--show_attention", default=None, metavar="OUT.png",
                   help=f"save the first image (or video frame) with a heatmap of the answer's attention to its visual "
                        f"tokens (mean over all heads, the last {ATTN_LAYERS} layers and every generated token)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Model and tokenizer


def load_tokenizer(path):
    """-> (tokenizer, ours). ours: written by train.py (ckpt.pt, tokenizer.txt or our config.json)."""
    if not os.path.exists(path):
        raise SampleError(f"{path} does not exist: pass {MODELS}")
    ckpt = path if os.path.isfile(path) else os.path.join(path, "ckpt.pt")
    if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "config.json")) or not os.path.isfile(ckpt)):
        ckpt = None
    if ckpt:  # our training checkpoint names its tokenizer; mmap: read that field without loading the weights
        try:  # (a legacy, non-zip file cannot be mapped: a plain load)
            tok = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(ckpt))["tokenizer"]
        except Exception as e:
            raise SampleError(f"{ckpt}: not a readable nano-NEO checkpoint ({why(e)}); pass a ckpt.pt written by "
                              f"train.py, a folder it wrote, or a released NEO folder") from None
        ours = True
    else:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SampleError(f"{path}: no config.json or ckpt.pt; pass {MODELS}")
        tok = tokenizer.tokenizer_of(path)
        if tok is None:
            raise SampleError(f"{path}: no tokenizer (tokenizer.json, vocab.json or tokenizer.txt); copy the "
                              f"checkpoint's tokenizer files into it")
        ours = os.path.isfile(os.path.join(path, "tokenizer.txt")) or \
            '"nano_neo"' in open(os.path.join(path, "config.json"), errors="replace").read()
    try:
        enc = tokenizer.get_tokenizer(tok)
        tokenizer.special_ids(enc)
    except (ValueError, OSError, KeyError) as e:
        raise SampleError(f"{path}: cannot read its tokenizer {tok!r} ({why(e)}); use the tokenizer files that "
                          f"came with the checkpoint") from None
    return enc, ours


def load_config(path, enc):
    """The model's NEOConfig without its weights, checked against the tokenizer."""
    try:
        cfg, _ = checkpoint.read_config(path)
    except Exception as e:
        raise SampleError(f"cannot load {path} ({why(e)}); pass {MODELS} (one model's config and weights)") from None
    ids = tokenizer.special_ids(enc)
    if (ids["img_start"], ids["img_context"]) != (cfg.img_start_id, cfg.img_context_id) or enc.n_vocab > cfg.vocab_size:
        raise SampleError(f"{path}: tokenizer and model disagree (tokenizer: <img> {ids['img_start']}, <IMG_CONTEXT> "
                          f"{ids['img_context']}, {enc.n_vocab} ids; model: {cfg.img_start_id}, {cfg.img_context_id}, "
                          f"vocab {cfg.vocab_size}); use the tokenizer files that came with the checkpoint")
    return cfg


def load_model(path, device, dtype, enc):
    ids = tokenizer.special_ids(enc)
    try:  # each tensor cast as it is read: no float32 copy first. The image ids: the tokenizer's (load_config)
        model = NEO.from_pretrained(path, dtype=dtype, img_start_id=ids["img_start"],
                                    img_context_id=ids["img_context"], img_end_id=ids["img_end"])
    except Exception as e:  # strict loading names the missing / unexpected / mis-shaped tensor
        raise SampleError(f"cannot load {path} ({why(e)}); pass {MODELS} (one model's config and weights)") from None
    try:
        model.eval().to(device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise SampleError(f"cannot put the model on --device={device} --dtype={str(dtype)[6:] or 'auto'} ({why(e)}); "
                          f"try --device=cpu") from None
    return model


def available_memory():
    """Bytes of memory free for a new allocation (Linux's MemAvailable); infinite where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return float("inf")


def choose_cpu_setting(model, prompt_len, max_new_tokens, steps=8):
    """--dtype=auto on a CPU: time a copy of one of the model's own layers in float32 and bf16, on one thread and
    on all, for this prompt's prefill and for one-token decode steps (common.probe_cpu, two rounds); -> (dtype,
    threads) with the shortest expected answer time. bf16 halves the bytes a large model's decode reads, but
    its GEMMs run at half the fp32 rate on CPUs without AVX512-BF16 or AMX; a small model's decode is bound by
    per-op overhead, where bf16's casts cost more than they save and a second thread only adds waiting (the toy:
    207 tok/s on one thread, 198 on two, 89 on two beside a busy process; EXPERIMENTS.md, section 'Speed on a CPU
    without AMX')."""
    import copy
    import dataclasses
    import time
    cfg = dataclasses.replace(model.cfg, n_layer=1, n_pre_layers=0)  # a one-layer cache for the one layer
    src = (list(model.pre_buffer) + list(model.post_llm))[0]
    L = max(1, min(prompt_len, 1024))  # longer prompts cost proportionally more in every setting
    pos = torch.stack((torch.arange(L), torch.zeros(L, dtype=torch.long), torch.zeros(L, dtype=torch.long)))
    pos1 = torch.tensor([[[L]], [[0]], [[0]]])
    mask = torch.ones(1, 1, L, L, dtype=torch.bool).tril()
    n_new = min(max_new_tokens, 128)  # answers seldom use all of a large --max_new_tokens
    dtypes = [torch.float32, torch.bfloat16]
    if next(model.parameters()).dtype != torch.float32 and 4 * model.num_params() > 0.8 * available_memory():
        dtypes = [next(model.parameters()).dtype]  # a float32 copy of these weights would not fit in memory
    blocks = {dt: copy.deepcopy(src).to(dt) for dt in dtypes}

    def seconds_of(setting):  # the answer's expected time: the prompt's prefill, then n_new decode steps
        dt, th = setting
        rope, rope1 = model.rope_tables(pos[:, None], dt), model.rope_tables(pos1, dt)
        torch.set_num_threads(th)
        x = torch.randn(1, L, cfg.d_model, dtype=dt)
        cache = KVCache(cfg, 1, L + steps + 1, "cpu", dt)
        t0 = time.perf_counter()
        y = blocks[dt](x, rope, mask, cache)
        t1 = time.perf_counter()
        for _ in range(steps):
            y = blocks[dt](y[:, -1:], rope1, None, cache)
        t2 = time.perf_counter()
        return (t1 - t0) * prompt_len / L + n_new * (t2 - t1) / steps
    with torch.inference_mode():
        times = probe_cpu([(dt, th) for dt in dtypes for th in sorted({1, torch.get_num_threads()})], seconds_of, 2)
    best = min(times, key=times.get)
    print(f"dtype auto: one layer, prefill {prompt_len} tokens + {n_new} decode steps: " +
          ", ".join(f"{str(d)[6:]} x{t} {1e3 * v:.1f} ms" for (d, t), v in times.items()) +
          f" -> {str(best[0])[6:]}, {best[1]} thread{'s' if best[1] > 1 else ''}", file=sys.stderr)
    return best


# -----------------------------------------------------------------------------
# Prompt


def build_messages(question, n_images, stamps, duration, preset, system):
    """-> [(role, text)] with one `<image>` per image and video frame (images first), for data.build_prompt.
    stamps: the video frames' times in seconds (None: no video); duration: the video's length in seconds."""
    n_frames = len(stamps or [])
    if preset == "shapes":  # as ShapesWorld trains: "<image><image>Which image ...?"
        user = "<image>" * n_images + (data.video_prompt(stamps, duration) if n_frames else "") + question
    elif n_images + n_frames == 1:  # reorganize_prompt's one-image form, in every kit
        user = "<image>\n" + question
    elif preset == "neo-ov":  # unnumbered, in the message's order: images first, as the kit's datasets list them
        video = data.video_prompt(stamps, duration, authors=True) if n_frames else ""
        user = "<image>\n" * n_images + video + question
    else:  # neo1 and neo-ov-si number several images; their videos differ
        user = "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images)) if n_images > 1 else "<image>\n" * n_images
        if n_frames and preset == "neo1":  # no times: build_video_prompt renames the numbered images to frames
            user += "".join(f"Frame-{i + 1}: <image>\n" for i in range(n_frames))
        elif n_frames:
            user += data.video_head(n_frames, duration, authors=True) + "\n".join(
                f"Frame{i + 1} is at [{data.timestamp(t)}]:<image>" for i, t in enumerate(stamps)) + "\n"
        user += question
    return ([("system", system)] if system else []) + [("user", user)]


def default_question(n_images, video, preset):
    what = "video" if video else "images" if n_images > 1 else "image"
    if preset == "shapes":  # as ShapesWorld asks
        return f"Describe the {what}."
    return f"Describe {'these' if what == 'images' else 'this'} {what} in detail."


def text_pieces(tokens, enc, stops=None):
    """Token ids -> text as it streams. Bytes wait until they form whole UTF-8 characters (a byte-level token
    can end mid-character); stops at an id in stops (default <|im_end|> and <|endoftext|>); special tokens
    print nothing (skip_special_tokens=True)."""
    ids = tokenizer.special_ids(enc)
    stops = stops or {ids["im_end"], ids["eot"]}
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tok in tokens:
        if tok in stops:
            break
        if tok not in enc.hidden and tok < enc.n_vocab:  # ids past the tokenizer: the model's vocab padding
            yield utf8.decode(enc.decode_single_token_bytes(tok))
    yield utf8.decode(b"", final=True)


def stripped(pieces):
    """The answer as the authors' chat() returns it, .strip()ped: leading whitespace dropped, trailing
    whitespace held back until more text follows it."""
    held, started = "", False
    for p in pieces:
        held += p
        if not started:
            held = held.lstrip()
            started = bool(held)
        body = held.rstrip()
        if body:
            yield body
            held = held[len(body):]


# -----------------------------------------------------------------------------
# --draw_mask (the README's picture of NEO's indices and mask) and --show_attention


def draw_mask(path):
    """Teaching picture: the (t, h, w) index of every token and the mixed mask (row i may attend to column j)
    for text, a 2x2-token image, text, a 1x2-token image, and a two-frame video with timestamps."""
    cfg = NEOConfig()
    S, E, V = cfg.img_start_id, cfg.img_end_id, cfg.img_context_id
    toks = "A <img> v v v v </img> B <img> v v </img> [0s] <img> v v </img> [1s] <img> v v </img> C".split()
    ids = torch.tensor([[{"<img>": S, "</img>": E, "v": V}.get(t, 65) for t in toks]])
    pos, img_id = build_positions(ids, [(2, 2), (1, 2), (1, 2), (1, 2)], cfg)
    m = build_attention_mask(torch.zeros_like(ids), img_id)[0, 0]
    L, c, left, top = len(toks), 28, 120, 120
    font = ImageFont.load_default(size=12)
    im = Image.new("RGB", (left + L * c + 20, top + L * c + 70), "white")
    d = ImageDraw.Draw(im)
    colors = [(230, 120, 120), (120, 170, 230), (120, 200, 140), (220, 190, 90)]
    names = ["image 1 (2x2 tokens)", "image 2 (1x2)", "video frame 0 (1x2)", "video frame 1 (1x2)"]
    for k, label in enumerate(("token", "t", "h", "w")):
        d.text((left - 50, 8 + 26 * k), label, fill="black", font=font)
    for i in range(L):
        name = "img" if toks[i] == "<img>" else "/img" if toks[i] == "</img>" else toks[i]
        col = colors[int(img_id[0, i])] if img_id[0, i] >= 0 else "black"
        for k, text in enumerate((name, *(str(int(pos[a, 0, i])) for a in range(3)))):
            d.text((left + i * c + c // 2, 14 + 26 * k), text, fill=col, font=font, anchor="mm")
        d.text((8, top + i * c + c // 2), f"{name:>5}  t={int(pos[0, 0, i])}", fill=col, font=font, anchor="lm")
        for j in range(L):
            if m[i, j]:
                same = img_id[0, i] >= 0 and img_id[0, i] == img_id[0, j]
                d.rectangle([left + j * c, top + i * c, left + j * c + c - 3, top + i * c + c - 3],
                            fill=colors[int(img_id[0, i])] if same else (110, 110, 110))
    y = top + L * c + 12
    d.text((8, y), "grey: causal (j <= i).  colour: bidirectional inside one image or frame (j > i allowed).",
           fill="black", font=font)
    for k, name in enumerate(names):
        d.rectangle([8 + 190 * k, y + 24, 22 + 190 * k, y + 38], fill=colors[k])
        d.text((28 + 190 * k, y + 24), name, fill="black", font=font)
    save_png(im, path)
    print(f"wrote {path}: row i attends to column j where filled; each image/frame uses one t, (h, w) = its grid")


def heatmap(values, grid, base, path):
    """values (gh*gw,) row-major over the visual tokens -> base image blended with a jet-like heatmap."""
    gh, gw = grid
    v = values.reshape(gh, gw).float().cpu().numpy()
    v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
    v = np.asarray(Image.fromarray(v.astype(np.float32), "F").resize(base.size, Image.BILINEAR))  # (H, W)
    heat = np.stack([np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)], axis=-1) * 255  # r, g, b
    out = 0.5 * np.asarray(base.convert("RGB"), dtype=np.float32) + 0.5 * heat
    save_png(Image.fromarray(out.clip(0, 255).astype(np.uint8)), path)


def to_pil(x):
    """A normalised (3, H, W) tensor back to a PIL image (for video frames, drawn at the size the model saw)."""
    x = x.float().cpu() * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


# -----------------------------------------------------------------------------
# Main: load, build the prompt, stream the answer


def main(argv=None):
    args = get_args(argv)
    for flag in ("draw_mask", "show_attention"):
        if getattr(args, flag):
            check_out_png(getattr(args, flag), f"--{flag}")
    if args.draw_mask:
        return draw_mask(args.draw_mask)
    device = choose_device(args.device)
    # --dtype=auto: bf16 on a GPU, float32 on mps; on a CPU the model loads in its checkpoint's dtype and
    # choose_cpu_setting then measures which dtype and thread count run it fastest here
    auto_cpu = args.dtype == "auto" and device == "cpu"
    dtype = None if auto_cpu else getattr(torch, args.dtype if args.dtype != "auto" else
                                          "bfloat16" if "cuda" in device else "float32")
    check_args(args)

    # the tokenizer and config (--dry_run needs no more), then the settings in force
    path = args.init_from or os.path.join(args.out_dir, "final")
    if not args.init_from and not os.path.exists(path):
        raise SampleError(f"no model at {path}: run `python train.py` first (it writes {path}/), "
                          f"or pass --init_from=DIR ({MODELS})")
    enc, ours = load_tokenizer(path)
    cfg = load_config(path, enc)
    name = choose_preset(args.preset, ours, path)
    s = settings(name, args, cfg)
    authors = name != "shapes"  # the released models' image loading and frame sampling (data.authors_rgb)

    images, first, stamps, duration = load_visuals(args, s, authors)
    question = args.prompt or default_question(len(args.image), args.video, name)
    msgs = build_messages(question, len(args.image), stamps, duration, name, s["system"])
    try:
        prompt = data.build_prompt(enc, msgs, images)
    except data.DataError as e:
        raise SampleError(f"cannot build the prompt ({e})") from None
    L = len(prompt["input_ids"])
    if L >= cfg.max_seq_len:
        raise SampleError(f"the prompt with its images is {L} tokens, over the model's context of {cfg.max_seq_len}: "
                          f"lower --max_pixels, pass fewer images or --num_frames, or shorten --prompt")
    if args.dry_run:  # exactly what the model would read: special tokens and image spans written out
        print(describe(name, s), file=sys.stderr)
        print(enc.decode(prompt["input_ids"]), end="")
        return
    n_new = min(s["max_new_tokens"], cfg.max_seq_len - L)

    model = load_model(path, device, dtype, enc)
    print(describe(name, s), file=sys.stderr)  # after the last error that can stop us: one line per failure
    if args.quantize == "int8":  # before --dtype=auto's probe, so that it times the int8 layer
        print(quantize_int8(model), file=sys.stderr)
    if auto_cpu:
        dtype, threads = choose_cpu_setting(model, L, n_new)
        model.to(dtype)
        torch.set_num_threads(threads)
    print(f"{path}: {model.num_params() / 1e6:.1f}M parameters, prompt {L} tokens, up to {n_new} new, "
          f"{device} {str(next(model.parameters()).dtype)[6:]}", file=sys.stderr)
    stream_answer(model, prompt, n_new, s, args, enc, authors, first, device)


def check_args(args):
    """Every flag's range, before any work (SampleError)."""
    check_quantize(args.quantize)
    if not args.image and not args.video:
        raise SampleError("nothing to look at: pass --image FILE (repeatable) or --video PATH")
    bad = [f"--{k}={v}" for k, v, ok in (
        ("num_frames", args.num_frames, args.num_frames >= 1),
        ("video_fps", args.video_fps, args.video_fps is None or 0 < args.video_fps < float("inf")),
        ("max_new_tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1),
        ("temperature", args.temperature, args.temperature is None or 0 <= args.temperature < float("inf")),
        ("top_p", args.top_p, args.top_p is None or 0 < args.top_p <= 1),
        ("repetition_penalty", args.repetition_penalty,
         args.repetition_penalty is None or 0 < args.repetition_penalty < float("inf"))) if not ok]
    if bad:
        raise SampleError(f"{', '.join(bad)}: --num_frames and --max_new_tokens must be at least 1, --temperature a "
                          f"number from 0 (greedy) up, --top_p in (0, 1], --repetition_penalty and --video_fps "
                          f"numbers above 0")
    for flag in ("prompt", "system"):
        if "<image>" in (getattr(args, flag) or ""):
            raise SampleError(f"--{flag} holds '<image>': sample.py puts each --image / --video frame into the "
                              f"prompt itself; leave the placeholder out")
    for flag in ("min_pixels", "max_pixels"):
        if getattr(args, flag) is not None and not K <= getattr(args, flag) <= data.MAX_PIXELS:
            raise SampleError(f"--{flag}={getattr(args, flag)} is outside 1024 (one 32x32 visual token) to "
                              f"{data.MAX_PIXELS} (data.MAX_PIXELS, a 4096x4096 image)")


def check_quantize(value):
    if value not in ("none", "int8"):
        raise SampleError(f"--quantize={value}: choose int8 (weight-only int8 Linear layers) or none")


def load_visuals(args, s, authors):
    """Images and video frames, at native resolution within the pixel budget; -> (tensors, the first as a PIL
    image for --show_attention, the frames' times in seconds or None, the video's length or None)."""
    images, first, stamps, duration = [], None, None, None
    for f in args.image:
        try:  # a missing, empty or corrupt file raises DataError naming it and saying why
            pil = data.open_image(f, authors)
            images.append(data.to_tensor(pil, *s["image_pixels"]))
        except data.DataError as e:
            raise SampleError(f"{e}; --image takes an image file (JPEG, PNG, WebP, ...)") from None
        first = pil if first is None else first
    if args.video:
        src = args.video[0] if len(args.video) == 1 else args.video
        try:
            frames, stamps, duration = data.load_video(src, args.num_frames, *s["frame_pixels"], authors=authors,
                                                       sample_fps=args.video_fps)
        except data.DataError as e:
            raise SampleError(f"{e}; --video takes a video file (mp4, webm, mov, ...), a folder of frame images, "
                              f"an animated GIF/WebP or frame files") from None
        first = to_pil(frames[0]) if first is None else first
        images.extend(frames)
    return images, first, stamps, duration


def stream_answer(model, prompt, n_new, s, args, enc, authors, first, device):
    """Generate and print the answer as it comes; --show_attention: then draw where it looked."""
    cfg, ids = model.cfg, tokenizer.special_ids(enc)
    x = torch.tensor([prompt["input_ids"]], device=device)
    imgs = [im.to(device) for im in prompt["images"]]
    # --show_attention: the last layers keep their attention maps; after every step we read the row of the
    # query that produced the new token, at the first image's visual tokens
    maps, layers = [], (list(model.pre_buffer) + list(model.post_llm))[-ATTN_LAYERS:]
    if args.show_attention:
        for blk in layers:
            blk.self_attn.keep_attn = True
        cfg.attn = "sdpa"  # a dense bool mask: FlexAttention's BlockMask cannot give the attention matrix
        grid = (prompt["images"][0].shape[1] // cfg.token_px, prompt["images"][0].shape[2] // cfg.token_px)
        pos = (x[0] == cfg.img_context_id).nonzero()[:grid[0] * grid[1], 0]  # the first span, row-major

    def record(stream):
        for tok in stream:
            if args.show_attention:
                maps.append(sum(blk.self_attn.last_attn[0, :, -1, pos].mean(0) for blk in layers) / len(layers))
            yield tok

    stream = model.generate_stream(x, imgs, max_new_tokens=n_new, temperature=s["temperature"], top_k=s["top_k"],
                                   eos_id=ids["im_end"], seed=args.seed, vocab_limit=enc.n_vocab, top_p=s["top_p"],
                                   repetition_penalty=s["repetition_penalty"])
    # the authors' chat() stops at <|im_end|> alone and strips the answer; the toy also stops at <|endoftext|>
    pieces = text_pieces(record(stream), enc, {ids["im_end"]} if authors else None)
    for piece in stripped(pieces) if authors else pieces:
        print(piece, end="", flush=True)
    print(flush=True)
    if args.show_attention:
        heatmap(torch.stack(maps).mean(0), grid, first, args.show_attention)
        print(f"wrote {args.show_attention}: attention of {len(maps)} answer tokens to the {len(pos)} visual tokens "
              f"of the first image (mean over heads and the last {len(layers)} layers)", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except SampleError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
