"""
Data for nano-NEO: everything between files on disk and the tensors the model eats, in the order a sample flows.

1. an image -> a (3, H, W) tensor at native resolution: smart resize to multiples of 32 px, ImageNet normalisation
2. a conversation -> a sample: chat template, an image span of <IMG_CONTEXT> tokens per image, labels on
   assistant turns; a video is its frames, each after a text timestamp (NEO-ov)
3. samples -> packed rows -> a batch, and a deterministic, resumable, rank-sharded loader of batches
4. where samples come from: LLaVA/NEO JSON/JSONL datasets (the toy's own world, ShapesWorld, is shapes.py)
5-6. after the pipeline, reading files safely: bad images; videos through PyAV (which frames, seeking)

    enc = get_tokenizer("/path/Qwen3-1.7B")      # or "shapes", the toy's (text <-> ids: tokenizer.py)
    loader = PackedLoader(JSONLDataset("ann.jsonl", image_root="/path/images", enc=enc), batch_size=8)
    batch = next(iter(loader))  # input_ids, targets, loss_weights, doc_ids: (B, L); images: [(3, H, W), ...]
    python -m pytest -q test_data.py
"""
import json
import math
import os
import random
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tokenizer import encode_text, get_tokenizer, special_ids

IGNORE_INDEX = -100  # same value as neo.IGNORE_INDEX; not imported so data.py loads without the model


# -----------------------------------------------------------------------------
# 1. Images -> tensors at native resolution

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
FACTOR = 32             # one visual token = 32x32 px (16-px patches, 2x2 downsampling)
MAX_ASPECT = 200        # Qwen2-VL / NEO reject longer strips
MAX_PIXELS = 16384 * FACTOR * FACTOR  # pixel budget ceiling: 16384 visual tokens (Qwen2-VL's default token budget),
#                                       a 4096x4096 image; 200 MB as a float tensor, not the 40 GB of an unchecked 1e10


def smart_resize(h, w, min_pixels, max_pixels, factor=FACTOR):
    """Qwen2-VL's resize: both sides multiples of `factor`, h*w in [min_pixels, max_pixels], aspect kept."""
    if not factor * factor <= min_pixels <= max_pixels <= MAX_PIXELS:
        raise ValueError(f"need {factor * factor} <= min_pixels ({min_pixels}) <= max_pixels ({max_pixels}) "
                         f"<= {MAX_PIXELS} (data.MAX_PIXELS)")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise DataError(f"aspect ratio {max(h, w) / min(h, w):.0f}:1 is over {MAX_ASPECT}:1")
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
        while hb * wb > max_pixels:  # a very long strip clamped to one token row: shorten its long side
            hb, wb = (hb - factor, wb) if hb > wb else (hb, wb - factor)
    elif hb * wb < min_pixels:  # rounding up may pass max_pixels a little (min = max: NEO-ov's spatial setting)
        beta = math.sqrt(min_pixels / (h * w))  # and it stays so, as in the authors' and Qwen2-VL's code
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def to_tensor(img, min_pixels, max_pixels):
    """RGB PIL image -> smart-resized, normalised (3, H, W) float tensor."""
    w, h = img.size
    hb, wb = smart_resize(h, w, min_pixels, max_pixels)
    if (wb, hb) != (w, h):
        img = img.resize((wb, hb), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def load_image(path_or_pil, min_pixels=64 * 64, max_pixels=256 * 256, authors=False):
    """Any file PIL reads (or a PIL image) -> (3, H, W) float tensor, H and W multiples of 32."""
    img = open_image(path_or_pil, authors)
    try:
        return to_tensor(img, min_pixels, max_pixels)
    except DataError as e:
        raise DataError(f"{getattr(path_or_pil, 'filename', None) or path_or_pil}: {e}") from None


# -----------------------------------------------------------------------------
# 2. Conversations -> samples: chat template, image spans, labels; a video's text around its frames


def image_span(img, ids):
    n = (img.shape[1] // FACTOR) * (img.shape[2] // FACTOR)
    return [ids["img_start"]] + [ids["img_context"]] * n + [ids["img_end"]]


PLACEHOLDERS = "images and <image> placeholders disagree"


def encode_chat(enc, messages, images=()):
    """messages [(role, text)], each `<image>` in a text takes the next image -> sample dict.
    Template `<|im_start|>{role}\\n{content}<|im_end|>\\n`; labels on assistant content and its <|im_end|>."""
    ids = special_ids(enc)
    input_ids, labels, k = [], [], 0
    nl = enc.encode("\n")

    def add(tokens, supervised):
        input_ids.extend(tokens)
        labels.extend(tokens if supervised else [IGNORE_INDEX] * len(tokens))

    for role, text in messages:
        sup = role == "assistant"
        add([ids["im_start"]] + enc.encode(role) + nl, False)
        for j, part in enumerate(text.split("<image>")):
            if j > 0:
                if k >= len(images):
                    raise DataError(f"more <image> placeholders than the {len(images)} images given", PLACEHOLDERS)
                add(image_span(images[k], ids), False)
                k += 1
            add(encode_text(enc, part), sup)
        add([ids["im_end"]], sup)
        add(nl, False)
    if k != len(images):
        raise DataError(f"{len(images)} images but {k} <image> placeholders", PLACEHOLDERS)
    return {"input_ids": input_ids, "labels": labels, "images": list(images)}


def encode_pair(enc, images, caption):
    """A pre-training pair without chat template: image spans, then the caption; labels on caption + eot."""
    ids = special_ids(enc)
    head = [t for img in images for t in image_span(img, ids)]
    text = encode_text(enc, caption) + [ids["eot"]]
    return {"input_ids": head + text, "labels": [IGNORE_INDEX] * len(head) + text, "images": list(images)}


def build_prompt(enc, messages, images=()):
    """Prompt for generation: the conversation so far, then `<|im_start|>assistant\\n`."""
    s = encode_chat(enc, messages, images)
    ids = s["input_ids"] + [special_ids(enc)["im_start"]] + enc.encode("assistant\n")
    return {"input_ids": ids, "images": s["images"]}


def video_head(n_frames, duration, authors=False):
    """The line before a video's frames. The authors' video datasets (VLMEvalKit_ov/vlmeval/dataset/videomme.py)
    print the rate as round(fps, 1) ("1.0"); the toy trained with "{fps:.2g}" ("1")."""
    mmss = lambda s: f"{int(s // 60):02d}:{int(s % 60):02d}"
    fps = n_frames / max(duration, 1e-6)
    return (f"The time range of this video is [{mmss(0)}-{mmss(duration)}], and the following is a series of "
            f"{n_frames} frames sampled at {round(fps, 1) if authors else format(fps, '.2g')} FPS.\n")


def timestamp(t):
    """Seconds -> "MM:SS.ss", a frame's timestamp."""
    return f"{int(t // 60):02d}:{t % 60:05.2f}"


def video_prompt(timestamps, duration, authors=False):
    """A video as text: video_head, then "[MM:SS.ss]:<image>" per frame (NEO-ov's layout)."""
    return video_head(len(timestamps), duration, authors) + "".join(f"[{timestamp(t)}]:<image>\n" for t in timestamps)


# -----------------------------------------------------------------------------
# 3. Samples -> packed rows -> batches, and the loader. Batch k is a pure function of (seed, k): its samples
# are drawn at random (with replacement, like nanoGPT's get_batch) from a generator seeded by (seed, k). So
# workers, ranks and resume need no coordination: rank r of W takes global batches r, r+W, ... (exactly the
# micro-batches one process would see with W-fold gradient accumulation); the position to resume is one integer.


def pack(samples, batch_size, max_seq_len, patience=None):
    """First-fit of whole samples into batch_size rows: -> (rows, leftover). A sample is never split, so
    neither is any image span. samples may be endless (the loader's): then packing stops once `patience`
    samples have found no room, and no further sample is drawn."""
    rows, free, left = [[] for _ in range(batch_size)], [max_seq_len] * batch_size, []
    for s in samples:
        b = next((b for b in range(batch_size) if free[b] >= len(s["input_ids"])), None)
        if b is None:
            left.append(s)
            if len(left) == patience:
                break
        else:
            rows[b].append(s)
            free[b] -= len(s["input_ids"])
    return rows, left


def collate(rows, max_seq_len, pad_id):
    """Rows of samples -> the batch dict of the contract. targets are the labels shifted left by one, per
    sample (the only shift in the code base); each supervised target of a sample with n of them weighs
    1/sqrt(n) ("square" weighting); doc_ids number a row's samples 0, 1, ... and are -1 on padding."""
    B, L = len(rows), max_seq_len
    x = torch.full((B, L), pad_id, dtype=torch.long)
    y = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    w = torch.zeros(B, L)
    doc = torch.full((B, L), -1, dtype=torch.long)
    images = []
    for b, row in enumerate(rows):
        p = 0
        for d, s in enumerate(row):
            n = len(s["input_ids"])
            assert p + n <= L, f"row {b} holds {p + n} tokens, more than max_seq_len {L}"
            t = torch.tensor(s["labels"][1:] + [IGNORE_INDEX])  # (n,) targets[i] = labels[i+1]
            x[b, p:p + n] = torch.tensor(s["input_ids"])
            y[b, p:p + n] = t
            sup = (t != IGNORE_INDEX).float()
            w[b, p:p + n] = sup / math.sqrt(max(sup.sum().item(), 1))
            doc[b, p:p + n] = d
            images.extend(s["images"])
            p += n
    return {"input_ids": x, "targets": y, "loss_weights": w, "doc_ids": doc, "images": images}


class PackedLoader:
    """Endless packed batches from `source` (ShapesWorld, JSONLDataset, or anything with len() and
    [i] -> sample or None). state_dict()/load_state_dict() resume exactly. Unusable samples are skipped and
    counted per reason (`skips`, with the first few offenders in `examples`; report() says it in lines); a
    warning names each reason when its count reaches 1, 10, 100, ..."""

    def __init__(self, source, batch_size=16, max_seq_len=512, rank=0, world_size=1, seed=0, num_workers=0,
                 patience=4):
        self.source, self.batch_size, self.max_seq_len = source, batch_size, max_seq_len
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.patience = patience  # stop filling a batch once this many samples found no room (pack)
        self.pad_id = special_ids(source.enc)["eot"]
        self.too_long_reason = f"longer than max_seq_len={max_seq_len}"
        self.step, self.skips, self.examples = 0, {}, {}

    @property
    def skipped(self):
        return sum(self.skips.values())

    @property
    def too_long(self):
        return self.skips.get(self.too_long_reason, 0)

    @property
    def bad(self):
        return self.skipped - self.too_long

    def skip_why(self, i, s):
        """Sample i (None: the source could not make it) -> (reason, where and what) if unusable, else None."""
        where = self.source.where(i) if hasattr(self.source, "where") else f"sample {i}"
        if s is None:
            return (getattr(self.source, "last_reason", "") or "bad sample",
                    getattr(self.source, "last_error", "") or where)
        if len(s["input_ids"]) > self.max_seq_len:
            return self.too_long_reason, f"{where} ({len(s['input_ids'])} tokens)"
        # a sample without a target teaches nothing, and 0 tokens always fit a row: the batch would never fill
        if all(t == IGNORE_INDEX for t in s["labels"][1:]):
            return "nothing to learn (no assistant turn or caption)", where
        return None

    def make_batch(self, k):
        """Global batch k -> (batch, {reason: [count, first example]} of the samples skipped for it)."""
        rng, skips = random.Random(f"batch/{self.seed}/{k}"), {}

        def usable():  # endless random draws, the unusable ones counted in skips and left out
            n = 0
            while True:
                i = rng.randrange(len(self.source))
                s = self.source[i]
                why = self.skip_why(i, s)
                if not why:
                    n += 1
                    yield s
                    continue
                skips.setdefault(why[0], [0, why[1]])[0] += 1
                if sum(c for c, _ in skips.values()) > 1000 and n == 0:
                    raise DataError("no usable sample in 1000 draws: " + "; ".join(
                        f"{c} {r} (first: {ex[:200]})" for r, (c, ex) in skips.items()), "no usable sample")

        rows, _ = pack(usable(), self.batch_size, self.max_seq_len, self.patience)
        return collate(rows, self.max_seq_len, self.pad_id), skips

    def __iter__(self):
        ds = _Batches(self, self.step)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers)) \
            if self.num_workers > 0 else iter(ds)
        for batch, skips in it:
            self.step += 1
            for reason, (n, example) in skips.items():
                before = self.skips.get(reason, 0)
                self.skips[reason] = before + n
                if len(self.examples.setdefault(reason, [])) < 3:
                    self.examples[reason].append(example[:300])
                if len(str(before)) != len(str(before + n)) or before == 0:  # at 1, 10, 100, ...
                    warnings.warn(f"skipped {before + n} samples {reason} so far (first: {self.examples[reason][0]})")
            yield batch

    def report(self):
        """The skips as lines, most frequent reason first: count, reason, the first few offenders."""
        return [f"{n} {r}; first: " + " | ".join(self.examples.get(r, [])) for r, n in
                sorted(self.skips.items(), key=lambda kv: -kv[1])]

    def state_dict(self):
        # batches consumed over all ranks: a resume with another world size continues from the same place
        return {"batches": self.step * self.world_size, "bad": self.bad, "too_long": self.too_long, "seed": self.seed,
                "skips": dict(self.skips), "examples": {r: list(e) for r, e in self.examples.items()}}

    def load_state_dict(self, s):
        self.step = s["batches"] // self.world_size
        self.skips = dict(s.get("skips") or {"bad sample": s["bad"], self.too_long_reason: s["too_long"]})
        self.skips = {r: n for r, n in self.skips.items() if n}
        self.examples = {r: list(e) for r, e in s.get("examples", {}).items()}


def to_device(batch, device):
    """A loader's batch on the device: its tensors and its images."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["images"] = [im.to(device, non_blocking=True) for im in batch["images"]]
    return out


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, loader, start):
        self.loader, self.start = loader, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        ld, m = self.loader, wid  # DataLoader takes from its workers in turn: worker w makes batches w, w+nw, ...
        while True:
            yield ld.make_batch(ld.rank + ld.world_size * (self.start + m))
            m += nw


# -----------------------------------------------------------------------------
# 4. LLaVA / NEO JSON(L) datasets

def skip_reason(e):
    """A record's error -> its kind, the key of the loader's skip report."""
    if isinstance(e, DataError):
        return e.reason
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        return "not valid JSON"
    if isinstance(e, OSError):
        return "unusable image or video"
    return "malformed record (a field missing or of the wrong type)"


def image_budget(n, min_pixels, max_pixels):
    """max_pixels of each of a record's n images, as the authors' loader gives it
    (VLMTrainKit/neo/data/data_processor.py, _get_item): the whole budget for one image, else twice the budget
    shared among them but never under min_pixels, so that a many-image sample stays about two images long."""
    return max_pixels if n <= 1 else max(max_pixels * 2 // n, min_pixels)


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class JSONLDataset:
    """Records {image: str|[str], images: [str], video: str|[str], conversations: [{from, value}]} (or
    {image, caption} pre-training pairs) from one or more .jsonl/.json files: "a.jsonl%50,b.json%200" keeps a
    fixed 50% of a and repeats b twice. JSONL is read lazily through line offsets; a .json list is loaded.
    Indexing returns a sample, or None for a bad record or unreadable image (counted in self.bad; why in
    self.last_reason and self.last_error, which names the file and line). max_pixels is one image's budget: a
    record's n > 1 images share it as image_budget says; a video's frames have video_max_pixels each.
    Paths are joined to image_root as they are: an absolute path or '..' reads a file anywhere the user can,
    as a local training script should; image_root is a convenience, not a boundary."""

    def __init__(self, spec, image_root="", enc=None, min_pixels=64 * 64, max_pixels=256 * 256, stage="sft",
                 video_frames=8, video_max_pixels=None, seed=0):
        self.root, self.enc, self.stage = image_root, enc or get_tokenizer("shapes"), stage
        self.min_pixels, self.max_pixels, self.video_frames = min_pixels, max_pixels, video_frames
        # per-frame budget: a quarter of an image's, so 8 frames cost about two images
        self.video_max_pixels = video_max_pixels or max(min_pixels, max_pixels // 4)
        self.files, files, recs = [], [], []
        for path, rate in self.parse_spec(spec):
            self.files.append((path, *self.index(path)))
            n = len(self.files[-1][1])
            m = round(n * rate / 100)
            # rate < 100: a fixed random subset (in file order); > 100: the file repeated
            keep = np.sort(np.random.default_rng(seed).permutation(n)[:m])
            recs.append(keep if m < n else np.resize(np.arange(n), m))
            files.append(np.full(m, len(self.files) - 1))
        self.file_of, self.rec_of = np.concatenate(files), np.concatenate(recs)
        if len(self.rec_of) == 0:
            raise DataError(f"{spec}: no records (empty file, or a rate that keeps none)", "no records")
        self.bad, self.last_error, self.last_reason = 0, "", ""

    @staticmethod
    def parse_spec(spec):
        """'a.jsonl%50,b.json' -> [(path, rate in %)]; a missing file is a DataError."""
        out = []
        for part in spec.split(","):
            path, _, rate = part.rpartition("%")
            path, rate = (path, float(rate)) if path and re.fullmatch(r"[\d.]+", rate) else (part, 100.0)
            if not os.path.isfile(path):
                raise DataError(f"{path or repr(path)}: no such file (--data takes 'shapes' or JSON/JSONL files, "
                                f"'a.jsonl%50,b.json')", "no such file")
            out.append((path, rate))
        return out

    @staticmethod
    def index(path):
        """-> (records: a list for .json, line offsets for JSONL; line numbers of the JSONL records or None)."""
        if path.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    recs = json.load(f)
            except ValueError as e:
                raise DataError(f"{path}: not valid JSON ({e})", "not valid JSON") from None
            if not isinstance(recs, list):
                raise DataError(f"{path}: a .json dataset is a list of records, got a {type(recs).__name__}",
                                "not a list of records")
            return recs, None
        offsets, lines, pos = [], [], 0
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(n)
                pos += len(line)
        return np.array(offsets, dtype=np.int64), np.array(lines, dtype=np.int64)

    def __len__(self):
        return len(self.rec_of)

    def record(self, i):
        path, recs, _ = self.files[self.file_of[i]]
        r = recs[self.rec_of[i]]
        if isinstance(recs, list):
            return r
        with open(path, "rb") as f:
            f.seek(int(r))
            return json.loads(f.readline())

    def where(self, i):
        """Record i as 'file:line' (JSONL) or 'file record k' (.json), for the skip report."""
        path, _, lines = self.files[self.file_of[i]]
        k = int(self.rec_of[i])
        return f"{path}:{lines[k]}" if lines is not None else f"{path} record {k}"

    def __getitem__(self, i):
        try:
            return self.to_sample(self.record(i))
        except (DataError, ValueError, KeyError, IndexError, TypeError, AttributeError, OSError) as e:
            self.bad += 1
            self.last_reason = skip_reason(e)
            self.last_error = f"{self.where(i)}: {e if isinstance(e, DataError) else f'{type(e).__name__}: {e}'}"
            return None

    def to_sample(self, rec):
        path = lambda p: os.path.join(self.root, p)
        files = rec.get("image", rec.get("images")) or []
        files = [files] if isinstance(files, str) else files
        video = rec.get("video")
        if self.stage == "llm" and (files or video):
            raise DataError("an image or video record in the text-only llm stage", "image or video in the llm stage")
        hi = image_budget(len(files), self.min_pixels, self.max_pixels)  # per image; video frames keep their own
        if "conversations" not in rec:  # a pre-training pair
            return encode_pair(self.enc, [load_image(path(f), self.min_pixels, hi) for f in files],
                               rec.get("caption", rec.get("text")))
        msgs = [(ROLES[c["from"]], c["value"]) for c in rec["conversations"]]
        first = next((j for j, (r, _) in enumerate(msgs) if r == "user"), 0)
        text = "\n".join(t for _, t in msgs)
        # LLaVA convention: a record without placeholders has its media at the start of the first user turn
        if files and "<image>" not in text:
            msgs[first] = ("user", "<image>\n" * len(files) + msgs[first][1])
        if video and "<video>" not in text:
            msgs[first] = ("user", "<video>\n" + msgs[first][1])
        # expand the placeholders in order: each <image> takes the next file, <video> its frames
        images, files, n_files, out = [], list(files), len(files), []
        for role, t in msgs:
            parts = re.split(r"(<image>|<video>)", t)
            for j, p in enumerate(parts):
                if p == "<image>":
                    if not files:
                        raise DataError(f"more <image> placeholders than its {n_files} image files", PLACEHOLDERS)
                    images.append(load_image(path(files.pop(0)), self.min_pixels, hi))
                elif p == "<video>":
                    v = [path(f) for f in video] if isinstance(video, list) else path(video)
                    frames, ts, dur = load_video(v, self.video_frames, self.min_pixels, self.video_max_pixels)
                    images.extend(frames)
                    parts[j] = video_prompt(ts, dur)
            out.append((role, "".join(parts)))
        if files:
            raise DataError(f"{n_files} image files but {n_files - len(files)} <image> placeholders", PLACEHOLDERS)
        return encode_chat(self.enc, out, images)


# -----------------------------------------------------------------------------
# 5. Reading image files: a bad file is refused with one line naming it

MAX_DECODE_PIXELS = Image.MAX_IMAGE_PIXELS  # ~89 Mpx: bigger files are refused before they are decoded


class DataError(ValueError):
    """A file or record that cannot be used; the message names it and says why. `reason` is its kind, the key
    of the loader's skip report."""

    def __init__(self, msg, reason="unusable image or video"):
        super().__init__(msg)
        self.reason = reason


def one_line(e):
    """An exception as one short line (train.py's and sample.py's error messages)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}{'...' if len(msg) > 300 else ''}"


def to_rgb(img):
    """Any PIL mode -> RGB. 16-bit and float greys are scaled to 8 bits; transparency is composited."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else (1.0 if a.max() <= 1 else 255.0)
        img = Image.fromarray(np.clip(a / hi * 255, 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        a = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = a[..., 3:] / 255
        lum = a[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        # white text on a transparent background would vanish on white: light content goes on black,
        # dark content on white (the common logo/icon case)
        bright = (lum * alpha[..., 0]).sum() > 127.5 * max(alpha.sum(), 1e-6)
        rgb = a[..., :3] * alpha + (0.0 if bright else 255.0) * (1 - alpha)
        img = Image.fromarray(rgb.round().astype(np.uint8), "RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, ...


def authors_rgb(img):
    """RGB as the released models were trained and evaluated (VLMEvalKit*/vlmeval/vlm/neo/utils.py,
    load_image_native): an RGBA image with some fully transparent pixel is composited on white (their contrast
    test compares a 0-255 mean with 382.5, so it never picks black); everything else, other RGBA included, is
    PIL's convert("RGB"), which drops alpha."""
    if img.mode == "RGBA":
        a = np.asarray(img.getchannel("A"))
        if (a == 0).any() and (a > 0).any():  # all transparent: their test finds no colour and converts
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.getchannel("A"))
            return bg
    return img.convert("RGB")


def check_file(path):
    name = str(path)
    if not os.path.isfile(name):
        raise DataError(f"{name}: no such file")
    if os.path.getsize(name) == 0:
        raise DataError(f"{name}: empty file")
    return name


def check_size(name, w, h):
    """Refuse a picture or video frame too big to decode, or too long a strip, before decoding it."""
    if w * h > MAX_DECODE_PIXELS:
        raise DataError(f"{name}: decompression bomb ({w}x{h} px is over the {MAX_DECODE_PIXELS} px limit)")
    if min(w, h) == 0 or max(w, h) / min(w, h) > MAX_ASPECT:
        raise DataError(f"{name}: aspect ratio {w}x{h} is over {MAX_ASPECT}:1")


def open_image(src, authors=False):
    """A PIL image in RGB, EXIF orientation applied; bad files raise DataError naming the file and the reason.
    authors=True: the released models' pipeline instead (authors_rgb, no EXIF rotation), the one they learnt."""
    if isinstance(src, Image.Image):
        name, img = "<PIL image>", src
    else:
        name = check_file(src)
        try:
            with warnings.catch_warnings():  # our own size check below is the one that decides
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(name)
        except Image.DecompressionBombError as e:
            raise DataError(f"{name}: decompression bomb ({e})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{name}: not an image ({e})") from None
    check_size(name, *img.size)
    try:
        img.load()
        return authors_rgb(img) if authors else to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{name}: truncated or corrupt image ({e})") from None


# -----------------------------------------------------------------------------
# 6. Video files, frame folders, animations (NEO-ov): which frames, and decoding only those

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def uniform_indices(n, k):
    """k indices spread evenly over n frames (the middle of k equal segments)."""
    return list(range(n)) if n <= k else [int((i + 0.5) * n / k) for i in range(k)]


def authors_indices(n, k):
    """k of n frames as the authors' evaluation samples them (VLMEvalKit*/vlmeval/dataset/videomme.py,
    save_video_frames): int(i * n / (k + 1)) for i = 1..k, with their float step; repeats when n <= k."""
    step = n / (k + 1)
    return [int(i * step) for i in range(1, k + 1)]


def frame_indices(n, k, fps, sample_fps=None, authors=False):
    """Which of n frames (fps: their mean rate) to keep. k frames: authors_indices (or the toy's uniform_indices).
    sample_fps: the authors' rate rule (VLMEvalKit_ov/vlmeval/dataset/videomme.py, save_video_frames with fps > 0):
    int(i * fps / sample_fps) for i < int(n / fps * sample_fps), or, when that is over k, int(i * n / (k + 1)) for
    i < k (their "1fps_max256" is sample_fps=1, k=256); at least one frame where they would take none."""
    if not sample_fps:
        return (authors_indices if authors else uniform_indices)(n, k)
    need = int(n / fps * sample_fps)
    step = fps / sample_fps if need <= k else n / (k + 1)
    return [min(int(i * step), n - 1) for i in range(max(1, min(need, k)))]


def read_video_file(name, num_frames, min_pixels, max_pixels, sample_fps, authors):
    """mp4, webm, mov, mkv, avi, ... through PyAV -> (frames, timestamps, duration), decoding only the frames
    chosen: a seek back to the keyframe before each, then forward to it, so memory and time follow the frames
    chosen, not the file's length. Times are the frames' own pts * time_base, from the first frame; a rotation in
    the stream's display matrix (phone videos) is undone, as players do. Bad files raise DataError naming them."""
    try:
        import av  # here, not at the top: the project imports and runs without it
    except ImportError:
        raise DataError(f"{name}: reading a video file needs PyAV: pip install av", "video file without PyAV "
                                                                                    "(pip install av)") from None
    check_file(name)
    try:
        c = av.open(name)
    except (av.FFmpegError, OSError) as e:
        raise DataError(f"{name}: not a video, or truncated ({e.strerror or e})") from None
    with c:
        if not c.streams.video:
            raise DataError(f"{name}: no video stream ({'audio only' if c.streams.audio else 'no streams'})")
        s = c.streams.video[0]
        if s.codec_context is None:
            raise DataError(f"{name}: unknown video codec (FFmpeg in PyAV {av.__version__} has no decoder for it)")
        if s.codec_context.width and s.codec_context.height:  # as the header says; 0: unknown until decoded
            check_size(name, s.codec_context.width, s.codec_context.height)
        tb, n, rate = s.time_base, s.frames, s.average_rate
        # frame times: the header's if it says constant rate (mp4, mov); else a demux-only pass over packet pts
        if n > 0 and rate and rate == s.guessed_rate and s.start_time is not None and s.duration:
            start, dur, fps, half = s.start_time, float(s.duration * tb), float(rate), 0.5 / rate / tb
            pts_of = lambda i: start + round(i / rate / tb)  # frame i's time, to within half a frame
        else:
            with av.open(name) as probe:
                pk = sorted((p.pts, p.duration or 0) for p in probe.demux(probe.streams.video[0]) if p.pts is not None)
            if not pk:
                raise DataError(f"{name}: no video frames")
            n, start = len(pk), pk[0][0]
            gap = (pk[-1][0] - start) / max(n - 1, 1)  # mean spacing, for packets that carry no duration
            dur = float((max(p + (d or gap) for p, d in pk) - start) * tb) or (c.duration or 0) / 1e6
            fps, half, pts_of = n / max(dur, 1e-6), 0, lambda i: pk[i][0]
        idx = frame_indices(n, num_frames, fps, sample_fps, authors)
        got, frames, last = {}, iter(c.decode(s)), start
        far = 2 / tb  # decoding on beats seeking for a frame under 2 s ahead (keyframes are 1-10 s apart)
        try:
            for t in sorted({pts_of(i) for i in idx}):
                if t - last > far:
                    try:
                        c.seek(t, stream=s)  # to the keyframe at or before t
                        frames = iter(c.decode(s))
                    except av.FFmpegError:  # a stream that cannot seek: decode on
                        pass
                f = next((f for f in frames if f.pts is not None and f.pts >= t - half), None)
                if f is None:
                    raise DataError(f"{name}: truncated (no frame at {float((t - start) * tb):.2f} s of {dur:.2f} s)")
                last, img = f.pts, f.to_image()
                rot = round(getattr(f, "rotation", 0) / 90) % 4  # counter-clockwise, as PIL's ROTATE_90
                img = img.transpose([None, Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270][rot]) if rot else img
                got[t] = (to_tensor(img, min_pixels, max_pixels), float((f.pts - start) * tb))
        except av.FFmpegError as e:
            raise DataError(f"{name}: truncated or corrupt video ({e.strerror})") from None
    frames, stamps = zip(*(got[pts_of(i)] for i in idx))
    return list(frames), list(stamps), dur


def load_video(path, num_frames=8, min_pixels=64 * 64, max_pixels=128 * 128, fps=1.0, authors=False,
               sample_fps=None):
    """A video file (mp4, webm, mov, mkv, avi, ...: read_video_file), a folder of frames, a list of frame files, or
    an animated GIF/WebP -> (frames: (3, H, W) tensors, timestamps, duration), which frames as frame_indices says.
    max_pixels is the budget PER FRAME: num_frames frames must fit the context. Frame files are taken to be `fps`
    apart; an animation uses its own frame durations; times in seconds. authors=True: frames chosen and loaded as
    the released models' evaluation does (authors_indices, authors_rgb); else the toy's (uniform_indices, to_rgb)."""
    if isinstance(path, (list, tuple)) or os.path.isdir(str(path)):
        files = list(path) if isinstance(path, (list, tuple)) else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXT))
        if not files:
            raise DataError(f"{path}: no frames")
        idx = frame_indices(len(files), num_frames, fps, sample_fps, authors)
        frames = [load_image(files[i], min_pixels, max_pixels, authors) for i in idx]
        return frames, [i / fps for i in idx], len(files) / fps
    if not str(path).lower().endswith(IMAGE_EXT):
        return read_video_file(str(path), num_frames, min_pixels, max_pixels, sample_fps, authors)
    img = open_image(path, authors)  # validates the file (missing, empty, bomb, ...); frames are read below
    anim = Image.open(path)
    n = getattr(anim, "n_frames", 1)
    starts, t = [], 0.0
    for i in range(n):  # each frame's start time from the animation's own durations (ms)
        anim.seek(i)
        starts.append(t)
        t += (anim.info.get("duration") or 1000 / fps) / 1000
    frames, idx = [], frame_indices(n, num_frames, n / t, sample_fps, authors)
    for i in idx:
        anim.seek(i)
        rgb = (authors_rgb if authors else to_rgb)(anim.convert("RGBA")) if n > 1 else img
        frames.append(to_tensor(rgb, min_pixels, max_pixels))
    return frames, [starts[i] for i in idx], t
