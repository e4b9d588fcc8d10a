"""
Tests for data.py, in its order: images, video, chat template and packing, JSONL datasets, the loader.
CPU only, no network, a few seconds in all.

    python -m pytest -q test_data.py
"""
import json
import math
import os
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
import shapes
from conftest import write_video
from data import IGNORE_INDEX, DataError
from tokenizer import get_tokenizer


# ---- images


def photo(w, h, mode="RGB"):
    """A photo-like image: smooth gradients plus noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx / w * 255, yy / h * 255, (xx + yy) % 255], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").convert(mode)


def huge_png_header(path, w, h):
    """A valid PNG whose header claims w x h: what a decompression bomb looks like before decoding."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                           + chunk(b"IEND", b""))


def test_bad_images(tmp_path):
    """Each kind of bad input raises DataError naming the file and the reason."""
    t = str(tmp_path)
    open(f"{t}/empty.png", "wb").close()
    open(f"{t}/text.jpg", "w").write("this is not an image\n")
    buf = f"{t}/full.jpg"
    photo(200, 150).save(buf, quality=90)
    open(f"{t}/truncated.jpg", "wb").write(open(buf, "rb").read()[:1500])
    Image.new("RGB", (2010, 10)).save(f"{t}/strip.png")
    huge_png_header(f"{t}/bomb.png", 100_000, 100_000)
    huge_png_header(f"{t}/bomb2.png", 10_000, 10_000)  # over our limit, under PIL's own hard error
    cases = {"missing.png": "no such file", "empty.png": "empty", "text.jpg": "not an image",
             "truncated.jpg": "truncated", "strip.png": "aspect", "bomb.png": "bomb", "bomb2.png": "bomb"}
    for f, why in cases.items():
        with pytest.raises(DataError, match=why) as e:
            data.load_image(f"{t}/{f}")
        assert f in str(e.value)
    assert data.load_image(buf).shape[0] == 3


def test_odd_photo_size():
    """451x300 -> both sides multiples of 32, pixel count within the budget, aspect about kept."""
    x = data.load_image(photo(451, 300), 64 * 64, 256 * 256)
    _, H, W = x.shape
    assert H % 32 == 0 and W % 32 == 0 and 64 * 64 <= H * W <= 256 * 256, x.shape
    assert abs(W / H - 451 / 300) < 0.25
    assert abs(x.mean().item()) < 2 and x.dtype == torch.float32  # normalised, not 0..255


def test_smart_resize_budget():
    """Every size from tiny to long strips lands on multiples of 32 within [min, max]."""
    for h, w in [(1, 1), (10, 1990), (31, 33), (300, 451), (4000, 3000), (64, 64), (100, 20000)]:
        hb, wb = data.smart_resize(h, w, 64 * 64, 256 * 256)
        assert hb % 32 == wb % 32 == 0 and 64 * 64 <= hb * wb <= 256 * 256, (h, w, hb, wb)


def test_image_modes_and_exif(tmp_path):
    """RGBA, palette, grayscale, 16-bit, CMYK all load; EXIF rotation applied; light RGBA goes on black."""
    im = photo(96, 64)
    for mode in ("RGBA", "P", "L", "LA", "CMYK", "1"):
        assert data.load_image(im.convert(mode)).shape == (3, 64, 96), mode
    g16 = Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 10).astype(np.uint16))
    p = str(tmp_path / "g16.png")
    g16.save(p)
    x = data.load_image(p)
    assert x.shape == (3, 64, 96) and x.max() > 1  # scaled from 16 bits, not clipped to black/white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 96x64 file shows as 64 wide, 96 tall
    p = str(tmp_path / "rot.jpg")
    im.save(p, exif=exif)
    assert data.load_image(p).shape == (3, 96, 64)
    white = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    white.paste((255, 255, 255, 255), (16, 16, 48, 48))
    rgb = np.asarray(data.to_rgb(white))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[32, 32].tolist() == [255, 255, 255]


def test_authors_image_loading(tmp_path):
    """authors=True, as VLMEvalKit's load_image_native: RGBA with a fully transparent pixel goes on white (white
    content too), alpha blended; RGBA without one, and LA, just drop alpha; no EXIF rotation."""
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    im.putpixel((1, 0), (0, 0, 0, 51))         # on white: 255 * (255 - 51) / 255 = 204
    im.putpixel((2, 0), (255, 255, 255, 255))  # white content: still white background (ours puts it on black)
    im.putpixel((3, 0), (10, 20, 30, 255))
    p = str(tmp_path / "a.png")
    im.save(p)
    rgb = np.asarray(data.open_image(p, authors=True))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [204, 204, 204]
    assert rgb[0, 2].tolist() == [255, 255, 255] and rgb[0, 3].tolist() == [10, 20, 30]
    opaque = Image.new("RGBA", (2, 2), (10, 20, 30, 1))  # nearly transparent, never fully: alpha dropped
    assert np.asarray(data.authors_rgb(opaque))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(data.authors_rgb(Image.new("LA", (2, 2), (90, 0))))[0, 0].tolist() == [90, 90, 90]
    exif = Image.Exif()
    exif[0x0112] = 6
    p = str(tmp_path / "rot.jpg")
    photo(96, 64).save(p, exif=exif)
    assert data.open_image(p, authors=True).size == (96, 64) and data.open_image(p).size == (64, 96)
    assert data.load_image(p, authors=True).shape == (3, 64, 96)


def test_smart_resize_as_the_authors():
    """Sizes worked by hand from the authors' smart_resize (VLMEvalKit*/vlmeval/vlm/neo/utils.py). Rounding up to
    min_pixels may pass max_pixels, and stays so: at NEO-ov's spatial budget (720*960 both) a 96x64 image
    gives beta = sqrt(691200 / 6144) = 10.607, 64*10.607/32 = 21.2 -> 22 rows, 96*10.607/32 = 31.8 -> 32
    columns: 704x1024 = 720,896 px (704 tokens)."""
    assert data.smart_resize(64, 96, 720 * 960, 720 * 960) == (704, 1024)
    # NEO 1.0's budget (1280..4096 tokens), a 451x300 photo: beta = sqrt(1310720 / 135300) = 3.1125,
    # 300*3.1125/32 = 29.2 -> 30, 451*3.1125/32 = 43.9 -> 44: 1,320 tokens
    assert data.smart_resize(300, 451, 1280 * 1024, 4096 * 1024) == (960, 1408)
    # over the max: beta = sqrt(3000*4000 / 4194304) = 1.6915, floor(1773.6/32) = 55, floor(2364.8/32) = 73
    assert data.smart_resize(3000, 4000, 1280 * 1024, 4096 * 1024) == (1760, 2336)


# ---- video


def test_video_sources(tmp_path):
    """GIF, folder of frames and a file list: uniform sampling, timestamps, NEO-ov's video text."""
    frames = [Image.new("RGB", (64, 64), (i * 20, 0, 0)) for i in range(10)]
    gif = str(tmp_path / "v.gif")
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=500, loop=0)
    os.makedirs(tmp_path / "frames")
    files = []
    for i, f in enumerate(frames):
        files.append(str(tmp_path / "frames" / f"{i:03d}.png"))
        f.save(files[-1])
    for src in (gif, str(tmp_path / "frames"), files):
        fr, ts, dur = data.load_video(src, num_frames=4, max_pixels=64 * 64)
        assert len(fr) == 4 and all(f.shape == (3, 64, 64) for f in fr)
        assert ts == sorted(ts) and ts[0] >= 0 and ts[-1] < dur
    assert dur == 10 and data.load_video(gif, 4)[2] == pytest.approx(5.0)  # GIF: 500 ms per frame
    # sampled frames are spread out: frame 1, 3, 6, 8 of 10 (their red channel tells which)
    fr, ts, _ = data.load_video(files, 4)
    assert ts == [1, 3, 6, 8]
    text = data.video_prompt([0.0, 2.5, 5.0], 7.5)
    assert text.startswith("The time range of this video is [00:00-00:07], and the following is a series of 3 frames")
    assert "[00:02.50]:<image>\n" in text and text.count("<image>") == 3


def test_video_as_the_authors_sample_it(tmp_path):
    """authors=True: frames at int(i * n / (k + 1)), i = 1..k (VLMEvalKit_ov/vlmeval/dataset/videomme.py), and
    the rate printed as round(fps, 1): "2.0" where the toy prints "2"."""
    assert data.authors_indices(10, 4) == [2, 4, 6, 8]    # step 10 / 5 = 2
    assert data.authors_indices(8, 4) == [1, 3, 4, 6]     # step 1.6: 1.6, 3.2, 4.8, 6.4
    assert data.authors_indices(3, 4) == [0, 1, 1, 2]     # step 0.6: fewer frames than asked repeat
    files = []
    for i in range(10):
        files.append(str(tmp_path / f"{i:03d}.png"))
        Image.new("RGB", (64, 64), (i * 20, 0, 0)).save(files[-1])
    fr, ts, dur = data.load_video(files, 4, authors=True)
    assert ts == [2, 4, 6, 8] and dur == 10 and [round(f[0, 0, 0].item(), 3) for f in fr] == \
        [round((i * 20 / 255 - 0.485) / 0.229, 3) for i in (2, 4, 6, 8)]
    assert data.video_head(4, 2.0, authors=True) == ("The time range of this video is [00:00-00:02], and the "
                                                     "following is a series of 4 frames sampled at 2.0 FPS.\n")
    assert data.video_head(4, 2.0).endswith("sampled at 2 FPS.\n")


def square_x(frame):
    """The left column of the moving square in a (3, H, W) frame loaded at its own width."""
    cols = (frame.mean(0)[:4] > 0).any(0).nonzero()
    return int(cols[0])


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_video_file_frames_and_times(tmp_path, ext):
    """An mp4 (H.264, frame count in the header: no pass over the file) and a webm (VP8, no count: the packets'
    times are read, nothing decoded): 20 frames at 10 fps, 2.0 s. The frames are the ones the authors' rules pick
    (VLMEvalKit_ov/vlmeval/dataset/videomme.py), worked by hand below, timed by their own pts."""
    v = write_video(tmp_path / f"clip{ext}")
    kw = dict(min_pixels=64 * 64, max_pixels=64 * 64)  # 64x48 -> 64x64: columns where they were
    # 4 frames: step 20 / 5 = 4 -> frames 4, 8, 12, 16 at 0.4, 0.8, 1.2, 1.6 s
    fr, ts, dur = data.load_video(v, 4, authors=True, **kw)
    assert ts == pytest.approx([0.4, 0.8, 1.2, 1.6]) and dur == pytest.approx(2.0)
    assert [square_x(f) for f in fr] == [8, 16, 24, 32] and fr[0].shape == (3, 64, 64)
    # the toy's segment middles: int((i + 0.5) * 5) = 2, 7, 12, 17
    fr, ts, _ = data.load_video(v, 4, **kw)
    assert ts == pytest.approx([0.2, 0.7, 1.2, 1.7]) and [square_x(f) for f in fr] == [4, 14, 24, 34]
    # a rate: 3 per second gives int(2.0 * 3) = 6 <= 8 frames, every 10 / 3 = 3.33rd: 0, 3, 6, 10, 13, 16
    fr, ts, _ = data.load_video(v, 8, sample_fps=3, authors=True, **kw)
    assert ts == pytest.approx([0.0, 0.3, 0.6, 1.0, 1.3, 1.6]) and [square_x(f) for f in fr] == [0, 6, 12, 20, 26, 32]
    # ... capped at 4: 6 > 4, so int(i * 20 / 5) for i = 0..3: 0, 4, 8, 12
    assert data.load_video(v, 4, sample_fps=3, authors=True, **kw)[1] == pytest.approx([0.0, 0.4, 0.8, 1.2])
    assert data.video_prompt(ts[:4], dur, authors=True) == (
        "The time range of this video is [00:00-00:02], and the following is a series of 4 frames sampled at 2.0 FPS."
        "\n[00:00.00]:<image>\n[00:00.30]:<image>\n[00:00.60]:<image>\n[00:01.00]:<image>\n")


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_video_file_long_seeks(tmp_path, ext):
    """A 60 s file (5 fps, a keyframe every 5 s): the frames 7.5 s apart are reached by seeking, not by decoding
    all 300, and they are the right ones (each shows its number in binary)."""
    v = write_video(tmp_path / f"long{ext}", n=300, fps=5, size=(96, 32), gop=25, bits=True)
    fr, ts, dur = data.load_video(v, 8, 32 * 32, 96 * 32, authors=True)  # int(i * 300 / 9), i = 1..8
    number = lambda f: sum(1 << b for b in range(12) if f.mean(0)[:8, 8 * b + 4].mean() > 0)
    assert [number(f) for f in fr] == [33, 66, 100, 133, 166, 200, 233, 266] and dur == pytest.approx(60.0)
    assert ts == pytest.approx([6.6, 13.2, 20.0, 26.6, 33.2, 40.0, 46.6, 53.2])


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_video_file_variable_rate(tmp_path, ext):
    """Frames at 0, 0.1, 0.2, 1.0, 1.1 and 3.0 s (hand-set pts): the timestamps are those, not i / fps, and the
    duration is the file's, 3.1 s (the last frame lasts 1/10 s, the stream's nominal rate)."""
    v = write_video(tmp_path / f"vfr{ext}", n=6, times=[0, 0.1, 0.2, 1.0, 1.1, 3.0])
    # the authors' 4 of 6: step 1.2 -> int(1.2, 2.4, 3.6, 4.8) = frames 1, 2, 3, 4
    fr, ts, dur = data.load_video(v, 4, 64 * 64, 64 * 64, authors=True)
    assert ts == pytest.approx([0.1, 0.2, 1.0, 1.1]) and dur == pytest.approx(3.1)
    assert [square_x(f) for f in fr] == [2, 4, 6, 8]
    # the toy's: int((i + 0.5) * 1.5) = frames 0, 2, 3, 5
    assert data.load_video(v, 4)[1] == pytest.approx([0.0, 0.2, 1.0, 3.0])


def test_video_file_rotated_and_odd_size(tmp_path):
    """A phone video is stored sideways with a display matrix: it loads upright. A 64x32 frame with its 8x8
    square in the top-left corner, rotated 90 degrees counter-clockwise for display, is 32x64 with the square in the
    bottom-left; -90 (clockwise, a phone's "rotate=90"): top-right. A 37x23 px file loads too."""
    for rot, rows, cols in ((90, slice(56, 64), slice(0, 8)), (-90, slice(0, 8), slice(24, 32))):
        v = write_video(tmp_path / f"rot{rot}.mp4", n=1, size=(64, 32), rotation=rot)
        f = data.load_video(v, 1, 32 * 32, 64 * 64)[0][0]
        assert f.shape == (3, 64, 32)
        bright = f.mean(0) > 0
        assert bright[rows, cols].all() and bright.sum() == 64, (rot, bright.nonzero())
    for ext in (".mp4", ".webm"):  # 37x23 is 851 px: scaled up by sqrt(4096 / 851) = 2.19 to 96x64
        fr, ts, _ = data.load_video(write_video(tmp_path / f"odd{ext}", size=(37, 23)), 4)
        assert [tuple(f.shape) for f in fr] == [(3, 64, 96)] * 4 and ts == pytest.approx([0.2, 0.7, 1.2, 1.7])


def test_bad_video_files(tmp_path, monkeypatch):
    """Each bad file: a DataError naming the file and saying why (sample.py prints it as one line; training
    skips the record and counts it)."""
    av = pytest.importorskip("av", reason="reading and writing video files needs PyAV: pip install av")
    good = write_video(tmp_path / "good.mp4", n=30)
    raw = open(good, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(raw[:len(raw) // 2])  # the index (moov) is written last: gone
    fast = str(tmp_path / "fast.mp4")  # the index first, then half the frames' data
    with av.open(good) as src, av.open(fast, "w", options={"movflags": "faststart"}) as dst:
        s = dst.add_stream_from_template(src.streams.video[0])
        for p in src.demux(src.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                dst.mux(p)
    raw = open(fast, "rb").read()
    (tmp_path / "fast_cut.mp4").write_bytes(raw[:len(raw) * 2 // 3])
    with av.open(str(tmp_path / "audio.m4a"), "w") as c:  # a voice memo: AAC only
        s = c.add_stream("aac", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        f.sample_rate = 8000
        c.mux(s.encode(f))
        c.mux(s.encode())
    raw = open(write_video(tmp_path / "ok.mp4"), "rb").read()
    assert raw.count(b"avc1") == 2  # the brand and the sample entry's codec: a codec no FFmpeg knows
    (tmp_path / "unknown.mp4").write_bytes(raw.replace(b"avc1", b"qqq1"))
    (tmp_path / "text.mp4").write_text("not a video\n" * 10)
    (tmp_path / "empty.webm").write_bytes(b"")
    cases = {"cut.mp4": "not a video, or truncated", "fast_cut.mp4": "truncated", "audio.m4a":
             "no video stream (audio only)", "unknown.mp4": "unknown video codec", "text.mp4": "not a video",
             "empty.webm": "empty file", "gone.mp4": "no such file"}
    for name, why in cases.items():
        with pytest.raises(DataError) as e:
            data.load_video(str(tmp_path / name), 8)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}: ") and why in msg and "\n" not in msg, (name, msg)
    monkeypatch.setattr(data, "MAX_DECODE_PIXELS", 3000)  # 64x48 = 3072 px: over, refused before decoding
    with pytest.raises(DataError, match=r"good\.mp4: decompression bomb \(64x48 px is over the 3000 px limit\)"):
        data.load_video(good, 8)


def test_video_file_without_pyav(tmp_path, monkeypatch):
    """Without PyAV a video file is one line saying `pip install av` (its own skip reason in training); GIFs,
    frame folders and images still work, and data.py imports without it."""
    import subprocess
    import sys
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(DataError, match=r"clip\.mp4: reading a video file needs PyAV: pip install av") as e:
        data.load_video(str(tmp_path / "clip.mp4"), 8)
    assert "pip install av" in e.value.reason
    frames = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert len(data.load_video(str(tmp_path / "v.gif"), 2)[0]) == 2
    code = "import sys; sys.modules['av'] = None; import data, sample, train; print('ok')"
    p = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout == "ok\n", p.stderr


# ---- conversations and packing


def test_chat_labels_only_on_assistant():
    enc = get_tokenizer("bytes")
    img = torch.zeros(3, 64, 96)
    s = data.encode_chat(enc, [("system", "sys"), ("user", "<image>hi"), ("assistant", "yo")], [img])
    text = enc.decode(s["input_ids"]).replace("<IMG_CONTEXT>", "")
    assert text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n<img></img>hi<|im_end|>\n" \
                   "<|im_start|>assistant\nyo<|im_end|>\n"
    assert s["input_ids"].count(261) == 6
    sup = [t for t, l in zip(s["input_ids"], s["labels"]) if l != IGNORE_INDEX]
    assert enc.decode(sup) == "yo<|im_end|>"
    with pytest.raises(DataError):
        data.encode_chat(enc, [("user", "<image><image>")], [img])
    p = data.encode_pair(enc, [img], "a cat")
    assert enc.decode([t for t, l in zip(p["input_ids"], p["labels"]) if l != IGNORE_INDEX]) == "a cat<|endoftext|>"


def test_packing():
    """Spans stay whole, targets are the labels shifted exactly once, weights 1/sqrt(n), doc ids restart."""
    w = shapes.ShapesWorld("midtrain")
    samples = [w[i] for i in range(40)]
    rows, left = data.pack(samples, 3, 400)
    batch = data.collate(rows, 400, pad_id=256)
    x, y, lw, d = batch["input_ids"], batch["targets"], batch["loss_weights"], batch["doc_ids"]
    assert x.shape == y.shape == lw.shape == d.shape == (3, 400)
    assert len(batch["images"]) == sum(len(s["images"]) for r in rows for s in r)
    k = 0
    for b, row in enumerate(rows):
        p = 0
        for doc, s in enumerate(row):
            n = len(s["input_ids"])
            assert x[b, p:p + n].tolist() == s["input_ids"] and (d[b, p:p + n] == doc).all()
            assert y[b, p:p + n].tolist() == s["labels"][1:] + [IGNORE_INDEX]
            n_sup = sum(l != IGNORE_INDEX for l in s["labels"])
            assert torch.allclose(lw[b, p:p + n][y[b, p:p + n] != IGNORE_INDEX], torch.tensor(1 / math.sqrt(n_sup)))
            assert (lw[b, p:p + n][y[b, p:p + n] == IGNORE_INDEX] == 0).all()
            p += n
        assert (d[b, p:] == -1).all() and (y[b, p:] == IGNORE_INDEX).all() and (lw[b, p:] == 0).all()
        # every image span is whole and matches its image, in order
        ids = x[b].tolist()
        for i, t in enumerate(ids):
            if t == 259:
                H, W = batch["images"][k].shape[1:]
                n = H // 32 * W // 32
                assert ids[i + 1:i + 1 + n] == [261] * n and ids[i + 1 + n] == 260
                k += 1
    assert k == len(batch["images"])
    neo = pytest.importorskip("neo")  # the model's t restarts at 0 at each document of the packed row
    cfg = neo.NEOConfig()
    grids = [(im.shape[1] // 32, im.shape[2] // 32) for im in batch["images"]]
    pos, _ = neo.build_positions(x, grids, cfg, d)
    starts = (d[:, 1:] != d[:, :-1]) & (d[:, 1:] >= 0)
    assert (pos[0, :, 1:][starts] == 0).all() and (pos[0, :, 0] == 0).all()


# ---- JSONL datasets


def test_jsonl_dataset(tmp_path):
    """Single image, image list, `images`, video, text-only and pre-training records load; a broken line and
    a missing image are skipped and counted; name%rate changes the size."""
    root = tmp_path / "imgs"
    os.makedirs(root / "clip")
    photo(451, 300).save(root / "a.jpg")
    photo(100, 200).save(root / "b.png")
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(root / "clip" / f"{i}.png")
    recs = [
        {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                             {"from": "gpt", "value": "A photo."}]},
        {"image": ["a.jpg", "b.png"], "conversations": [{"from": "human", "value": "Compare."},
                                                         {"from": "gpt", "value": "Two."}]},
        {"images": ["b.png"], "conversations": [{"from": "system", "value": "Be brief."},
                                                {"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "ok"}]},
        {"video": "clip", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                            {"from": "gpt", "value": "It turns red."}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"image": "a.jpg", "caption": "a gradient"},
        {"image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
    ]
    p = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in recs]
    lines.insert(3, '{"image": "a.jpg", "conversations": [')  # a broken line
    p.write_text("\n".join(lines) + "\n\n")
    ds = data.JSONLDataset(str(p), image_root=str(root), max_pixels=128 * 128, video_frames=4)
    assert len(ds) == 8
    out = [ds[i] for i in range(len(ds))]
    assert sum(s is None for s in out) == 2 and ds.bad == 2 and "missing.jpg" in ds.last_error
    good = [s for s in out if s is not None]
    assert [len(s["images"]) for s in good] == [1, 2, 1, 4, 0, 1]
    enc = ds.enc
    assert "The time range of this video" in enc.decode(good[3]["input_ids"])
    assert enc.decode([t for t, l in zip(good[1]["input_ids"], good[1]["labels"]) if l >= 0]) == "Two.<|im_end|>"
    assert all(im.shape[1] * im.shape[2] <= 128 * 128 for s in good for im in s["images"])
    assert len(data.JSONLDataset(f"{p}%50,{p}%200", image_root=str(root))) == 4 + 16
    (tmp_path / "d.json").write_text(json.dumps(recs))  # a .json list works the same way
    dj = data.JSONLDataset(str(tmp_path / "d.json"), image_root=str(root), video_frames=4)
    assert [len(dj[i]["images"]) for i in range(6)] == [1, 2, 1, 4, 0, 1] and dj[6] is None
    loader = data.PackedLoader(ds, batch_size=2, max_seq_len=300, seed=0)
    b = batches(loader, 2)
    assert b[0]["input_ids"].shape == (2, 300) and loader.bad > 0  # bad records drawn, skipped, counted


def test_images_of_one_record_share_the_budget(tmp_path):
    """n > 1 images of one record get max(max_pixels * 2 // n, min_pixels) each, as the authors' loader gives
    them; one or two images the whole budget; a video's frames keep their own budget whatever the images."""
    for name in ("a.png", "b.png", "c.png", "f0.png", "f1.png"):
        photo(256, 256).save(tmp_path / name)
    conv = [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]
    recs = [{"images": ["a.png", "b.png", "c.png"], "conversations": conv},
            {"images": ["a.png", "b.png"], "conversations": conv},
            {"image": "a.png", "video": ["f0.png", "f1.png"], "conversations": conv},
            {"images": ["a.png", "b.png", "c.png"], "caption": "three"}]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tokens = lambda s: [im.shape[1] // 32 * (im.shape[2] // 32) for im in s["images"]]
    ds = data.JSONLDataset(str(p), image_root=str(tmp_path), min_pixels=32 * 32, max_pixels=256 * 256,
                           video_frames=2)
    # 3 images: 65536 * 2 // 3 = 43690 px each; a 256x256 photo: beta = sqrt(65536 / 43690) = 1.2247,
    # 256 / 1.2247 = 209.0 -> floor(209.0 / 32) * 32 = 192 px a side: 6 x 6 = 36 tokens (the whole budget: 64)
    assert tokens(ds[0]) == [36, 36, 36] and tokens(ds[3]) == [36, 36, 36]
    # 2 images: 65536 * 2 // 2 = 65536, the whole budget: 256x256 stays, 8 x 8 = 64 tokens
    assert tokens(ds[1]) == [64, 64]
    # 2 frames at the frames' own budget, max(1024, 65536 // 4) = 16384: 128x128 = 4 x 4 = 16 tokens, then the
    # one image at the whole budget, 64 (without placeholders the video comes first in the turn)
    assert tokens(ds[2]) == [16, 16, 64]
    # the budget never goes under min_pixels: max(43690, 65536) = 65536, so 3 images of 64 tokens each
    ds = data.JSONLDataset(str(p), image_root=str(tmp_path), min_pixels=256 * 256, max_pixels=256 * 256)
    assert tokens(ds[0]) == [64, 64, 64]


# ---- loader


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "targets", "loss_weights", "doc_ids")) and \
        len(a["images"]) == len(b["images"]) and all(torch.equal(x, y) for x, y in zip(a["images"], b["images"]))


def test_loader_determinism_resume_and_sharding():
    """Same seed, same batches (with or without workers); resume from state_dict continues exactly; rank r of
    2 gets global batches r, r+2, ... (disjoint, and together one process's stream)."""
    w = shapes.ShapesWorld("midtrain")
    mk = lambda **kw: data.PackedLoader(w, batch_size=2, max_seq_len=256, seed=7, **kw)
    ref = batches(mk(), 6)
    assert all(same(a, b) for a, b in zip(ref, batches(mk(), 6)))
    assert not same(ref[0], batches(data.PackedLoader(w, 2, 256, seed=8), 1)[0])
    l1 = mk()
    it = iter(l1)
    for _ in range(3):
        next(it)
    l2 = mk()
    l2.load_state_dict(l1.state_dict())
    assert same(next(iter(l2)), ref[3])
    r0, r1 = batches(mk(rank=0, world_size=2), 3), batches(mk(rank=1, world_size=2), 3)
    assert all(same(a, ref[2 * i]) and same(b, ref[2 * i + 1]) for i, (a, b) in enumerate(zip(r0, r1)))
    assert not same(r0[0], r1[0])
    assert all(same(a, b) for a, b in zip(ref[:4], batches(mk(num_workers=2), 4)))
    assert (ref[0]["doc_ids"] >= 0).float().mean() > 0.8  # rows are well filled


def test_too_long_skipped_with_warning():
    """Samples longer than max_seq_len are skipped, counted, and reported with the count."""
    w = shapes.ShapesWorld("midtrain")
    loader = data.PackedLoader(w, batch_size=1, max_seq_len=60, seed=0)
    with pytest.warns(UserWarning, match=r"skipped \d+ samples longer than max_seq_len=60"):
        b = batches(loader, 3)
    assert loader.too_long > 0 and loader.skipped == loader.too_long
    assert all((x["doc_ids"] >= 0).sum() <= 60 for x in b)
    assert loader.state_dict()["too_long"] == loader.too_long


def test_pixel_budget_has_a_ceiling():
    """A pixel budget above data.MAX_PIXELS (or min over max) is refused before anything is resized: 1e10 px
    for a 1x1 image would be a 40 GB tensor."""
    with pytest.raises(ValueError, match="MAX_PIXELS"):
        data.smart_resize(1, 1, 10 ** 10, 10 ** 10)
    for lo, hi in ((32 * 32, data.MAX_PIXELS + 1), (128 * 128, 64 * 64)):
        with pytest.raises(ValueError, match="MAX_PIXELS"):
            data.smart_resize(1, 1, lo, hi)
    assert data.smart_resize(1, 1, 32 * 32, data.MAX_PIXELS) == (32, 32)


def test_empty_conversations_do_not_hang(tmp_path):
    """Records whose conversations are empty make 0-token samples, which always fit a row: they are skipped as
    'nothing to learn', and when no record is usable the loader stops with a DataError instead of looping."""
    p = tmp_path / "empty.jsonl"
    p.write_text('{"conversations": []}\n' * 5)
    loader = data.PackedLoader(data.JSONLDataset(str(p), enc=get_tokenizer("bytes")), batch_size=2,
                               max_seq_len=64)
    with pytest.raises(DataError, match=r"no usable sample.*nothing to learn.*empty\.jsonl:\d"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            next(iter(loader))


def test_skips_are_reported_per_reason(tmp_path):
    """Each kind of unusable record is counted under its own reason, with the first offenders as file:line, and
    the counts survive a resume through state_dict."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    lines = [json.dumps({"image": "red.png", "conversations": conv("<image>What colour?", "red")}),  # line 1: good
             '{"image": "red.png", "conversations": [',                                            # 2: broken JSON
             json.dumps({"image": "gone.png", "conversations": conv("<image>?", "x")}),            # 3: no image
             json.dumps({"conversations": [{"value": "no role"}]}),                                # 4: malformed
             json.dumps({"conversations": conv("Hi", "")[:1]}),                                    # 5: no answer
             json.dumps({"conversations": conv("long " * 200, "x")}),                              # 6: too long
             json.dumps({"images": ["red.png", "red.png"], "conversations": conv("<image>?", "x")})]  # 7: 2 vs 1
    p = tmp_path / "mix.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ds = data.JSONLDataset(str(p), image_root=str(tmp_path), enc=get_tokenizer("bytes"))
    loader = data.PackedLoader(ds, batch_size=2, max_seq_len=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches(loader, 3)
    want = {"not valid JSON": ":2", "unusable image or video": ":3",
            "malformed record (a field missing or of the wrong type)": ":4",
            "nothing to learn (no assistant turn or caption)": ":5", "longer than max_seq_len=256": ":6",
            "images and <image> placeholders disagree": ":7"}
    assert set(loader.skips) == set(want), loader.skips
    for reason, line in want.items():
        assert loader.examples[reason][0].startswith(f"{p}{line}"), (reason, loader.examples[reason])
    assert "gone.png: no such file" in loader.examples["unusable image or video"][0]
    report = loader.report()
    assert len(report) == len(want) and all(re.match(r"\d+ ", line) for line in report)
    assert {str(w.message).split(" so far")[0].split(" samples ")[1] for w in caught
            if str(w.message).startswith("skipped")} == set(want)
    again = data.PackedLoader(ds, batch_size=2, max_seq_len=256)
    again.load_state_dict(loader.state_dict())
    assert again.skips == loader.skips and again.skipped == loader.skipped == again.bad + again.too_long


def test_jsonl_video_file_records(tmp_path):
    """A JSONL `video` record may name an mp4: its frames and the timed text go into the sample; a truncated
    or audio-only one is skipped and counted, the report naming the record's line and the file."""
    write_video(tmp_path / "clip.mp4")
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "clip.mp4").read_bytes()[:300])
    conv = [{"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "right"}]
    p = tmp_path / "v.jsonl"
    p.write_text("".join(json.dumps({"video": v, "conversations": conv}) + "\n" for v in ("clip.mp4", "cut.mp4")))
    enc = get_tokenizer("bytes")
    ds = data.JSONLDataset(str(p), image_root=str(tmp_path), enc=enc, video_frames=4)
    s = ds[0]  # the toy's frames 2, 7, 12, 17 of 20 at 10 fps; 64x48 at 4096 px -> 64x64, 2x2 tokens each
    assert len(s["images"]) == 4 and all(im.shape == (3, 64, 64) for im in s["images"])
    text = enc.decode(s["input_ids"]).replace("<IMG_CONTEXT>" * 4, "")
    assert ("The time range of this video is [00:00-00:02], and the following is a series of 4 frames sampled at "
            "2 FPS.\n[00:00.20]:<img></img>\n[00:00.70]:<img></img>\n[00:01.20]:<img></img>\n"
            "[00:01.70]:<img></img>\n\nWhich way?") in text
    assert ds[1] is None and ds.last_reason == "unusable image or video"
    assert ds.last_error.startswith(f"{p}:2: {tmp_path / 'cut.mp4'}: not a video, or truncated"), ds.last_error
