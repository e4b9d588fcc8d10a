"""
Tests for sample.py: end to end in a subprocess, on tiny random models in each checkpoint format we read
(our save_pretrained folder, our ckpt.pt, the authors' released layout with a tokenizer folder). Random
weights print garbage: these tests check the mechanics (exit code, output, PNG size, error lines), not words.

    python -m pytest -q test_sample.py
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sample
from neo import NEO, NEOConfig

HERE = os.path.dirname(os.path.abspath(__file__))
RELEASED = os.path.join(HERE, "assets", "neo_official_tiny")  # saved by the authors' own code


def run(*args, cwd):
    """sample.py in a subprocess -> CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def ok(p):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    return p


def write_tokenizer_json(path):
    """A tiny byte-level BPE in the released (Hugging Face) tokenizer.json format: 256 byte tokens in GPT-2's
    unicode alphabet, a few merges, and the added tokens at the ids of the fixture's config.json."""
    b2u = data.bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    added = {"<img>": 256, "</img>": 257, "<IMG_CONTEXT>": 258, "<|endoftext|>": 259, "<|im_start|>": 260,
             "<|im_end|>": 261}
    for i, tok in enumerate(["th", "the", b2u[ord(" ")] + "the", "in", "ing"]):
        vocab[tok] = 262 + i
    vocab.update(added)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                   "added_tokens": [{"id": i, "content": c, "special": True} for c, i in added.items()]}, f)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A work folder (no out/ in it) holding the models, images and a GIF the tests use."""
    d = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    cfg = NEOConfig.preset("toy", d_model=64, n_layer=2, n_pre_layers=1, n_head=4, n_kv_head=2, head_dim=16,
                           d_mlp=128, vision_dim=32)
    model = NEO(cfg)
    model.save_pretrained(d / "ours")                       # what train.py writes after a stage
    (d / "ours" / "tokenizer.txt").write_text("bytes\n")
    torch.save({"model": model.state_dict(), "model_config": asdict(cfg), "tokenizer": "bytes", "step": 1},
               d / "ckpt.pt")
    os.makedirs(d / "released")                             # the authors' layout + their tokenizer files
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(RELEASED, f), d / "released")
    write_tokenizer_json(d / "released")
    # a photo-like, non-square image of odd size: smooth gradients plus noise, saved as JPEG
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:77, 0:131]
    img = np.stack([xx * 1.9, yy * 3.3, (xx + yy) % 256], -1) + rng.normal(0, 12, (77, 131, 3))
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(d / "second.png")
    frames = [Image.new("RGB", (96, 64), (240, 240, 240)) for _ in range(5)]
    for i, f in enumerate(frames):
        f.paste((200, 30, 30), (8 + 16 * i, 20, 28 + 16 * i, 40))  # a square moving right
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    return d


def test_image_from_our_folder(w):
    """--image on our save_pretrained folder prints an answer, in the toy's ShapesWorld prompt format."""
    p = ok(run("--init_from", "ours", "--image", "photo.jpg", "--max_new_tokens=8", cwd=w))
    assert p.stdout.endswith("\n") and len(p.stdout) > 1
    assert "template shapes" in p.stderr


def test_two_images_from_ckpt(w):
    """Our ckpt.pt (its tokenizer field), two images, both flag spellings, sampling with top-k."""
    p = ok(run("--init_from=ckpt.pt", "--image=photo.jpg", "--image", "second.png", "--temperature=0.8",
               "--top_k=5", "--seed=3", "--max_new_tokens=8", cwd=w))
    n = len(data.build_prompt(data.get_tokenizer("bytes"), sample.build_messages(
        "Describe the images.", 2, None, "shapes", ""), [torch.zeros(3, 64, 128), torch.zeros(3, 64, 96)])["input_ids"])
    assert f"prompt {n} tokens" in p.stderr  # photo 131x77 -> 128x64 px: 2x4 tokens; second 2x3


def test_released_layout_with_tokenizer_folder(w):
    """The authors' checkpoint layout, tokenizer.json from the folder, the authors' chat template."""
    p = ok(run("--init_from", "released", "--image", "photo.jpg", "--max_pixels=65536", "--max_new_tokens=8",
               "--image", "second.png", cwd=w))
    assert "template neo" in p.stderr


def test_gif_video(w):
    """An animated GIF: frames sampled, each its own image after a timestamp."""
    ok(run("--init_from", "ours", "--video", "clip.gif", "--num_frames=3", "--max_new_tokens=4", cwd=w))


def test_show_attention_png_has_image_size(w):
    """--show_attention writes the image at its original size with the heatmap drawn over it."""
    out = w / "attn.png"
    ok(run("--init_from", "ours", "--image", "photo.jpg", "--show_attention", str(out), "--max_new_tokens=5", cwd=w))
    with Image.open(out) as im:
        assert im.size == (131, 77) and im.mode == "RGB"


def test_neo_prompt_layout():
    """The authors' chat template, image spans expanded, NEO-ov numbering for several images."""
    enc = data.get_tokenizer("bytes")
    img = torch.zeros(3, 64, 96)  # 2x3 tokens
    span = "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    one = data.build_prompt(enc, sample.build_messages("Q?", 1, None, "neo", "S"), [img])
    assert enc.decode(one["input_ids"]) == (f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{span}\nQ?"
                                            f"<|im_end|>\n<|im_start|>assistant\n")
    two = sample.build_messages("Q?", 2, None, "neo", "")
    assert two == [("user", "Image-1: <image>\nImage-2: <image>\nQ?")]
    assert sample.build_messages("Q?", 2, None, "shapes", "") == [("user", "<image><image>Q?")]


def test_text_pieces_waits_for_whole_characters():
    """A character split over byte tokens prints once whole; printing stops at <|im_end|>."""
    enc = data.get_tokenizer("bytes")
    toks = list("é!".encode()) + [data.special_ids(enc)["im_end"], ord("x")]
    pieces = list(sample.text_pieces(toks, enc))
    assert pieces[0] == "" and "".join(pieces) == "é!"


def test_bad_inputs(w):
    """Each bad input: one line on stderr saying what is wrong and what to do, exit 1, no traceback."""
    (w / "junk.pt").write_bytes(b"not a checkpoint")
    (w / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    os.makedirs(w / "no_frames", exist_ok=True)
    os.makedirs(w / "mismatch", exist_ok=True)  # our config.json with the authors' weights
    shutil.copy(w / "ours" / "config.json", w / "mismatch")
    shutil.copy(w / "released" / "model.safetensors", w / "mismatch")
    (w / "mismatch" / "tokenizer.txt").write_text("bytes\n")
    os.makedirs(w / "wrong_tok", exist_ok=True)  # the authors' weights with our bytes tokenizer: other image ids
    shutil.copy(w / "released" / "config.json", w / "wrong_tok")
    shutil.copy(w / "released" / "model.safetensors", w / "wrong_tok")
    (w / "wrong_tok" / "tokenizer.txt").write_text("bytes\n")
    cases = [
        (["--image", "photo.jpg"], "run `python train.py`"),                     # no out/final here
        (["--init_from", "ours", "--image", "missing.jpg"], "missing.jpg: no such file"),
        (["--init_from", "ours", "--image", "broken.jpg"], "broken.jpg: not an image"),
        (["--init_from", "ours", "--video", "no_frames"], "no frames"),
        (["--init_from", "junk.pt", "--image", "photo.jpg"], "not a readable nano-NEO checkpoint"),
        (["--init_from", "mismatch", "--image", "photo.jpg"], "does not match the config"),
        (["--init_from", "wrong_tok", "--image", "photo.jpg"], "tokenizer and model disagree"),
        (["--init_from", "ours", "--image", "photo.jpg", "--min_pixels=1000000", "--max_pixels=2000000"],
         "over the model's context"),
    ]
    for args, msg in cases:
        p = run(*args, cwd=w)
        err = p.stderr.strip()
        assert p.returncode == 1, (args, p.stderr)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
        assert err.startswith("sample.py: ") and msg in err, (args, err)


def test_draw_mask_needs_no_model(tmp_path):
    """--draw_mask draws the teaching picture without any model folder: one 28-px cell per token pair."""
    out = tmp_path / "mask.png"
    sample.main(["--draw_mask", str(out), "--out_dir", str(tmp_path / "nothing_here")])
    im = Image.open(out)
    assert im.size == (120 + 23 * 28 + 20, 120 + 23 * 28 + 70)  # 23 tokens in the example sequence


def test_more_bad_inputs_end_in_one_line(w):
    """<image> in --prompt or --system, a temperature that is not a number, a picture into a missing folder, a
    pixel budget past data.MAX_PIXELS (1e10 px for a 1x1 image was a 40 GB resize): one line, exit 1, before any
    work (no answer printed). A tiny positive temperature is just near-greedy sampling."""
    Image.new("RGB", (1, 1), "white").save(w / "dot.png")
    img = ["--init_from", "ours", "--image", "photo.jpg", "--max_new_tokens=4"]
    cases = [
        (img + ["--prompt", "What is in <image> here?"], "--prompt holds '<image>'"),
        (img + ["--system", "Look at <image>."], "--system holds '<image>'"),
        (img + ["--temperature=nan"], "--temperature a number"),
        (img + ["--show_attention", "no_such_dir/attn.png"], "does not exist"),
        (["--draw_mask", "no_such_dir/mask.png"], "does not exist"),
        (["--init_from", "ours", "--image", "dot.png", "--min_pixels=10000000000", "--max_pixels=10000000000"],
         "MAX_PIXELS"),  # last: before the ceiling existed, this one allocated 40 GB
    ]
    for args, msg in cases:
        p = run(*args, cwd=w)
        err = p.stderr.strip()
        assert p.returncode == 1 and p.stdout == "", (args, p.stdout, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (args, err)
        assert err.startswith("sample.py: ") and msg in err, (args, err)
    ok(run(*img, "--temperature=1e-45", cwd=w))
