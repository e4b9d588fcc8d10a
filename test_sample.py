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
import tokenizer
from neo import NEO
from conftest import inference_config, tiny_cfg, write_tokenizer_json, write_video

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


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A work folder (no out/ in it) holding the models, images and a GIF the tests use."""
    d = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    cfg = tiny_cfg()
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
    ticks = [Image.new("RGB", (96, 64), (20 * i, 90, 160)) for i in range(8)]  # 8 frames of 250 ms: 2 s
    ticks[0].save(d / "tick.gif", save_all=True, append_images=ticks[1:], duration=250, loop=0)
    # released folders in the inference kit's config format, config and tokenizer only (no weights: --dry_run),
    # with Qwen3's context so that NEO 1.0's 1,300-token frames fit
    with open(os.path.join(RELEASED, "config.json")) as f:
        hf = json.load(f)
    hf["llm_config"]["max_position_embeddings"] = 40960
    for name, template in (("neo1_cfg", "neo1_0"), ("next_cfg", "neo1_5"), ("untold_cfg", None)):
        os.makedirs(d / name)
        (d / name / "config.json").write_text(json.dumps(inference_config(hf, template)))
        write_tokenizer_json(d / name)
    return d


def test_image_from_our_folder(w):
    """--image on our save_pretrained folder prints an answer, in the toy's ShapesWorld prompt format."""
    p = ok(run("--init_from", "ours", "--image", "photo.jpg", "--max_new_tokens=8", cwd=w))
    assert p.stdout.endswith("\n") and len(p.stdout) > 1
    assert "preset shapes" in p.stderr


def test_two_images_from_ckpt(w):
    """Our ckpt.pt (its tokenizer field), two images, both flag spellings, sampling with top-k."""
    p = ok(run("--init_from=ckpt.pt", "--image=photo.jpg", "--image", "second.png", "--temperature=0.8",
               "--top_k=5", "--seed=3", "--max_new_tokens=8", cwd=w))
    msgs = sample.build_messages("Describe the images.", 2, None, None, "shapes", "")
    imgs = [torch.zeros(3, 64, 128), torch.zeros(3, 64, 96)]
    n = len(data.build_prompt(tokenizer.get_tokenizer("bytes"), msgs, imgs)["input_ids"])
    assert f"prompt {n} tokens" in p.stderr  # photo 131x77 -> 128x64 px: 2x4 tokens; second 2x3


def test_released_layout_with_tokenizer_folder(w):
    """The authors' checkpoint layout, tokenizer.json from the folder, NEO 1.0's preset (the folder names no
    template); NEO-ov's sampling (top_p, top_k, repetition penalty) runs too."""
    p = ok(run("--init_from", "released", "--image", "photo.jpg", "--max_pixels=65536", "--max_new_tokens=8",
               "--image", "second.png", cwd=w))
    assert "preset neo1: system ''" in p.stderr and "greedy" in p.stderr
    p = ok(run("--init_from", "released", "--image", "photo.jpg", "--max_pixels=65536", "--max_new_tokens=8",
               "--preset", "neo-ov", cwd=w))
    assert "preset neo-ov: system 'Reason step by step.'" in p.stderr and "top_p 0.95, top_k 20" in p.stderr


def test_quantize_int8(w):
    """--quantize=int8 on our folder (--dtype=auto then times the int8 layer) and on the released layout in bf16:
    one line says what became int8, then the answer."""
    for args, says in ((["--init_from", "ours"], "28 Linear layers (lm_head included) and the token embedding (tied"),
                       (["--init_from", "released", "--dtype=bfloat16", "--max_pixels=65536"],
                        "37 Linear layers (lm_head included) and the token embedding, per")):  # 3 or 4 layers x 9 + 1
        p = ok(run(*args, "--image", "photo.jpg", "--quantize=int8", "--max_new_tokens=8", cwd=w))
        assert "int8: " + says in p.stderr, p.stderr
        assert len(p.stdout) > 1


def test_gif_video(w):
    """An animated GIF: frames sampled, each its own image after a timestamp."""
    ok(run("--init_from", "ours", "--video", "clip.gif", "--num_frames=3", "--max_new_tokens=4", cwd=w))


def test_mp4_video(w, tmp_path):
    """A video file: --video clip.mp4 --num_frames 8 answers on our toy model; its 8 frames (64x48 -> 64x64,
    2x2 tokens each) are in the prompt."""
    clip = write_video(tmp_path / "clip.mp4")
    p = ok(run("--init_from", "ours", "--video", clip, "--num_frames", "8", "--max_new_tokens=4", cwd=w))
    stamps = [0.1, 0.3, 0.6, 0.8, 1.1, 1.3, 1.6, 1.8]  # the toy's frames of 20: int((i + 0.5) * 2.5) = 1, 3, 6, 8, ...
    msgs = sample.build_messages("Describe the video.", 0, stamps, 2.0, "shapes", "")
    n = len(data.build_prompt(tokenizer.get_tokenizer("bytes"), msgs, [torch.zeros(3, 64, 64)] * 8)["input_ids"])
    assert f"prompt {n} tokens" in p.stderr and len(p.stdout) > 1


def test_show_attention_png_has_image_size(w):
    """--show_attention writes the image at its original size with the heatmap drawn over it."""
    out = w / "attn.png"
    ok(run("--init_from", "ours", "--image", "photo.jpg", "--show_attention", str(out), "--max_new_tokens=5", cwd=w))
    with Image.open(out) as im:
        assert im.size == (131, 77) and im.mode == "RGB"


def test_neo_prompt_layout():
    """The authors' chat template, image spans expanded; NEO 1.0 numbers several images, NEO-ov does not."""
    enc = tokenizer.get_tokenizer("bytes")
    img = torch.zeros(3, 64, 96)  # 2x3 tokens
    span = "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    one = data.build_prompt(enc, sample.build_messages("Q?", 1, None, None, "neo1", "S"), [img])
    assert enc.decode(one["input_ids"]) == (f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{span}\nQ?"
                                            f"<|im_end|>\n<|im_start|>assistant\n")
    two = sample.build_messages("Q?", 2, None, None, "neo1", "")
    assert two == [("user", "Image-1: <image>\nImage-2: <image>\nQ?")]
    assert sample.build_messages("Q?", 2, None, None, "neo-ov", "") == [("user", "<image>\n<image>\nQ?")]
    assert sample.build_messages("Q?", 2, None, None, "shapes", "") == [("user", "<image><image>Q?")]


def span(n):
    return "<img>" + "<IMG_CONTEXT>" * n + "</img>"


def chat(user, system=""):
    """to_hf/conversation.py's neo1_0 template (MPT style): no system turn when the system message is empty."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# Visual tokens per image, worked by hand from the authors' smart_resize (min branch: beta = sqrt(min / (h*w)),
# sides ceil(side * beta / 32)). photo.jpg is 131x77, second.png and every video frame 96x64.
#   1280..4096 or 16384 tokens (neo1; neo-ov images): photo beta = sqrt(1310720 / 10087) = 11.399: 77 -> 27.4 -> 28,
#     131 -> 46.7 -> 47: 1316 tokens; 96x64: beta = sqrt(1310720 / 6144) = 14.606: 64 -> 29.2 -> 30,
#     96 -> 43.8 -> 44: 1320 tokens
#   720*960 both (neo-ov-si): photo beta = 8.278: 77 -> 19.9 -> 20, 131 -> 33.9 -> 34: 680; 96x64 beta = 10.607:
#     64 -> 21.2 -> 22, 96 -> 31.8 -> 32: 704 (both past the max, as there)
#   neo-ov frames 4..225 tokens: 96x64 rounds to itself, 2x3 = 6; the toy (ours: 4096..65536 px, frames to
#     16384): photo 64x128 = 8, second 6, frames 6
# tick.gif, 8 frames of 250 ms, --num_frames=4. The authors' frames: int(i * 8 / 5) = 1, 3, 4, 6, at 0.25, 0.75,
# 1.00, 1.50 s; 4 frames in 2 s: "2.0 FPS". The toy's: segment middles int((i + 0.5) * 2) = 1, 3, 5, 7.
TIMES = "The time range of this video is [00:00-00:02], and the following is a series of 4 frames sampled at {} FPS.\n"
NEO1 = {"one": chat(span(1316) + "\nQ?"),
        "two": chat("Image-1: " + span(1316) + "\nImage-2: " + span(1320) + "\nQ?"),
        "video": chat("".join(f"Frame-{i}: {span(1320)}\n" for i in (1, 2, 3, 4)) + "Q?")}
OV = {"one": chat(span(1316) + "\nQ?", "Reason step by step."),
      "two": chat(span(1316) + "\n" + span(1320) + "\nQ?", "Reason step by step."),
      "video": chat(TIMES.format("2.0") + "".join(f"[{t}]:{span(6)}\n" for t in ("00:00.25", "00:00.75", "00:01.00",
                                                                                   "00:01.50")) + "Q?",
                    "Reason step by step.")}
SI = {"one": chat(span(680) + "\nQ?"),
      "two": chat("Image-1: " + span(680) + "\nImage-2: " + span(704) + "\nQ?"),
      "video": chat(TIMES.format("2.0") + f"Frame1 is at [00:00.25]:{span(704)}\nFrame2 is at [00:00.75]:{span(704)}\n"
                    f"Frame3 is at [00:01.00]:{span(704)}\nFrame4 is at [00:01.50]:{span(704)}\nQ?")}
SHAPES = {"one": chat(span(8) + "Q?"), "two": chat(span(8) + span(6) + "Q?"),
          "video": chat(TIMES.format("2") + "".join(f"[{t}]:{span(6)}\n" for t in ("00:00.25", "00:00.75", "00:01.25",
                                                                                      "00:01.75")) + "Q?")}


@pytest.mark.parametrize("preset,folder,expected", [("neo1", "neo1_cfg", NEO1), ("neo-ov", "neo1_cfg", OV),
                                                     ("neo-ov-si", "neo1_cfg", SI), ("shapes", "ours", SHAPES)])
def test_dry_run_prints_the_authors_prompt(w, capsys, preset, folder, expected):
    """--dry_run prints exactly the text the authors' code builds (written out above from their template,
    reorganize_prompt, video datasets and smart_resize) for one image, two images and a video, and nothing
    else on stdout, from a folder without weights."""
    inputs = {"one": ["--image", str(w / "photo.jpg")],
              "two": ["--image", str(w / "photo.jpg"), "--image", str(w / "second.png")],
              "video": ["--video", str(w / "tick.gif"), "--num_frames=4"]}
    for case, args in inputs.items():
        sample.main(["--init_from", str(w / folder), "--preset", preset, "--prompt", "Q?", "--dry_run", *args])
        out = capsys.readouterr()
        assert out.out == expected[case], (preset, case)
        assert out.err.startswith(f"preset {preset}: ") and len(out.err.splitlines()) == 1


def test_dry_run_video_file_as_neo_ov(w, capsys, tmp_path):
    """An mp4 on a released NEO1_5-style folder (preset auto -> neo-ov): the time line, then "[MM:SS.ss]:" and
    one span per frame, as VLMEvalKit_ov's video datasets build them. 20 frames at 10 fps (2.0 s), 64x48 px each:
    4..225 tokens per frame keeps 64x64, 2x2 tokens. --num_frames 4: frames int(i * 20 / 5) = 4, 8, 12, 16;
    --video_fps 3: every 10 / 3 = 3.33rd frame while int(2.0 * 3) = 6 <= 8: 0, 3, 6, 10, 13, 16."""
    clip = write_video(tmp_path / "clip.mp4")
    for flags, stamps, rate in ((["--num_frames", "4"], ("00:00.40", "00:00.80", "00:01.20", "00:01.60"), "2.0"),
                                (["--video_fps", "3"], ("00:00.00", "00:00.30", "00:00.60", "00:01.00", "00:01.30",
                                                        "00:01.60"), "3.0")):
        sample.main(["--init_from", str(w / "next_cfg"), "--video", clip, "--prompt", "Q?", "--dry_run", *flags])
        out = capsys.readouterr()
        assert out.out == chat(f"The time range of this video is [00:00-00:02], and the following is a series of "
                               f"{len(stamps)} frames sampled at {rate} FPS.\n" +
                               "".join(f"[{t}]:{span(4)}\n" for t in stamps) + "Q?", "Reason step by step.")
        assert out.err.startswith("preset neo-ov: ")


def test_video_file_errors_are_one_line(w, tmp_path, monkeypatch):
    """Any video file without PyAV, and a file that is not a video: one line naming the file, exit 1."""
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "av", None)  # as if PyAV were not installed: `import av` fails
        with pytest.raises(sample.SampleError, match=r"clip\.webm: reading a video file needs PyAV: pip install av"):
            sample.main(["--init_from", str(w / "ours"), "--video", str(tmp_path / "clip.webm"), "--dry_run"])
    pytest.importorskip("av", reason="reading video files needs PyAV: pip install av")
    (tmp_path / "notes.mp4").write_text("not a video\n")
    p = run("--init_from", "ours", "--video", str(tmp_path / "notes.mp4"), cwd=w)
    err = p.stderr.strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"sample.py: {tmp_path / 'notes.mp4'}: not a video") and "--video takes a video file" in err


def test_preset_follows_the_folder_and_flags_override(w, capsys):
    """--preset auto: the config's template (neo1_0 -> neo1, NEO1_5's -> neo-ov; none -> neo1); our folders keep
    the toy's. Each flag overrides its setting; the stderr line says what is in force."""
    for folder, preset in (("neo1_cfg", "neo1"), ("next_cfg", "neo-ov"), ("untold_cfg", "neo1"), ("ours", "shapes")):
        sample.main(["--init_from", str(w / folder), "--image", str(w / "second.png"), "--dry_run"])
        assert capsys.readouterr().err.startswith(f"preset {preset}: ")
    sample.main(["--init_from", str(w / "next_cfg"), "--image", str(w / "second.png"), "--dry_run", "--system", "",
                 "--min_pixels=6144", "--max_pixels=65536", "--temperature=0", "--repetition_penalty=1",
                 "--max_new_tokens=7"])
    out = capsys.readouterr()
    assert out.out == chat(span(6) + "\nDescribe this image in detail.")
    assert out.err.strip() == ("preset neo-ov: system ''; images 6144-65536 px (6-64 tokens), video frames "
                               "6144-65536 px (6-64 tokens); greedy, repetition_penalty 1.0, max_new_tokens 7 "
                               "(flags override each)")


def test_answer_drops_special_tokens(tmp_path):
    """Decoded as skip_special_tokens=True: tokens the tokenizer marks special print nothing, other added
    tokens print their text; the authors' presets stop at <|im_end|> alone and strip the answer."""
    write_tokenizer_json(tmp_path, extra=[("<box>", True), ("<think>", False)])
    enc = tokenizer.get_tokenizer(str(tmp_path))
    toks = enc.encode(" a") + [267, 268] + enc.encode("b ") + [259] + enc.encode("c\n") + [261, ord("x")]
    assert "".join(sample.text_pieces(toks, enc)) == " a<think>b "          # the toy's: stops at <|endoftext|>
    assert "".join(sample.stripped(sample.text_pieces(toks, enc, {261}))) == "a<think>b c"


def test_text_pieces_waits_for_whole_characters():
    """A character split over byte tokens prints once whole; printing stops at <|im_end|>."""
    enc = tokenizer.get_tokenizer("bytes")
    toks = list("é!".encode()) + [tokenizer.special_ids(enc)["im_end"], ord("x")]
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
        (img + ["--quantize=int4"], "--quantize=int4: choose int8"),
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
