"""
ShapesWorld: the toy's built-in world, the data the toy model learns to see and speak from in minutes on a CPU
(as nanoGPT's data/shakespeare_char/ is its toy text). Small images (sides 64-160 px, so 4-25 visual tokens) on a
plain grey background, 1-4 large solid outlined shapes in 4 very distinct colours, 2 sizes. Each task family
(FAMILIES) asks questions with one short exact answer, balanced per question type, so a model that cannot see
scores at chance; score() is the exact-match scorer. Sample i of (stage, split, seed) is always the same sample.

    python shapes.py                  # writes one example per family (images + prompts) to shapes_examples/
    python shapes.py --tsv=ShapesWorld.tsv   # the held-out questions as a benchmark TSV, for eval.py
    python -m pytest -q test_data.py  # ShapesWorld's tests are there, with the pipeline's

    w = ShapesWorld("midtrain"); w.example(0)   # PIL images + question/answer turns; w[0] is the encoded sample
"""
import os
import random
from functools import lru_cache
from itertools import combinations

from PIL import Image, ImageDraw, ImageFont

from data import MEAN, build_prompt, encode_chat, get_tokenizer, to_tensor, video_prompt

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 0)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "big": 14}  # half-width in px: 16 and 28 px across, inside one 32-px token cell
CELL = 32  # = patch_size * downsample: one visual token covers one cell
# The background is the ImageNet mean, so it normalises to ~0: a light one is a large constant input to the patch
# conv that grows the visual tokens' norm and slows learning colour (EXPERIMENTS.md, section 'Earlier findings').
BACKGROUND = tuple(round(255 * m) for m in MEAN)  # (124, 116, 104)
INK = (20, 20, 20)
SIDES = (64, 96, 128, 160)
WORDS = ("cat", "dog", "sun", "box", "hat", "cup", "pen", "map")
DIRS = ("left", "right", "up", "down")
CHANGES = ("color", "shape", "size", "position")
VAL_SEED = 1_000_003  # the held-out split's own seed: fixed, whatever the training seed

# family -> (answer set or None, chance of a model that cannot see: 1/|answers| of the balanced set)
FAMILIES = {
    "caption": (None, 0.01),        # "big red circle, small blue square", left to right; 1-4 objects
    "color": (tuple(COLORS), 1 / 4),
    "shape": (SHAPES, 1 / 3),
    "count": (("1", "2", "3", "4"), 1 / 4),
    "spatial": (("left", "right", "above", "below"), 1 / 2),  # the question names the two options
    "size": (SHAPES, 1 / 2),        # "which is bigger, the X or the Y?": one of the two named
    "spatial_pick": (SHAPES, 1 / 2),  # "which is further left, the X or the Y?": one of the two named
    "read": (WORDS, 1 / 8),
    "multi_count": (("first", "second"), 1 / 2),
    "multi_change": (CHANGES, 1 / 4),
    "video_dir": (DIRS, 1 / 4),
    "video_appear": (("1", "2", "3", "4"), 1 / 4),
    "text": (None, None),           # answers are in the text: the llm stage's format and vocabulary
}
CHANCE = {f: c for f, (_, c) in FAMILIES.items()}
RELATION_FAMILIES = ("spatial", "spatial_pick")  # scored per axis too (score())
IMAGE_FAMILIES = ("caption", "color", "shape", "count", "spatial", "spatial_pick", "size", "read")
# Stage mixtures (relative weights). midtrain keeps NEO-ov's families (text, image, multi-image, video), not its
# 2:4:1:1 ratio: most weight on the two skills the toy learns last, finding an object by its shape (colour
# questions, ~30%) and listing 3-4 objects in order (captions); multi_turn gives 3-5 answers per image; little
# video, the costliest in tokens (EXPERIMENTS.md, sections 'The patch embedding frozen after pretrain, and twice
# the steps' and 'Earlier findings').
MIXES = {
    "llm": {"text": 1},
    "pretrain": {"caption": 7, "text": 3},
    "midtrain": {"text": 1, "multi_turn": 2, "caption": 3.5, "color": 4.25, "shape": 0.25, "count": 0.25, "size": 0.5,
                 "spatial": 0.25, "spatial_pick": 0.25, "read": 0.1, "multi_count": 0.5, "multi_change": 1,
                 "video_dir": 0.2, "video_appear": 0.2, "spatial_two": 0.5},
    "sft": {"text": 1, "multi_turn": 2, **{f: 3 / len(IMAGE_FAMILIES) for f in IMAGE_FAMILIES}, "multi_count": 0.5,
            "multi_change": 0.5, "video_dir": 0.5, "video_appear": 0.5, "spatial_two": 0.5},
    "spatial": {"spatial_yn_two": 1},  # the toy's spatial stage (train.py --spatial_curriculum=True)
}
# --spatial_curriculum=True (train.py; the long command): weights added to (or replacing) a stage's mixture, and
# the spatial stage between midtrain and sft. Inside a mixture the yes/no form ("Is the circle above or below the
# square?") never learns above/below; rows taught by top-to-bottom captions, then those questions alone, then sft
# with more of them does it. Not the default: at its budget the model does not know rows yet, and captions pay
# (EXPERIMENTS.md, section 'A spatial curriculum').
# Places (the default; train.py --places=False leaves them out, as the ablation does): video_dir answers with the
# shape's cell in the first and the last frame, then the direction ("(2, 0) to (2, 2): down"; see moved()), and
# pretrain adds captions with each object's cell ("grounding"): weights added to (or replacing) a stage's mixture.
PLACES = {"pretrain": {"caption": 5, "grounding": 2}, "midtrain": {"video_dir": 0.5}}
SPATIAL_CURRICULUM = {"pretrain": {"caption_rows": 3}, "midtrain": {"caption_rows": 1},
                      "sft": {"caption_rows": 0.5, "spatial": 1.375, "spatial_yn_two": 1}}


def new_objects(rng, n, distinct_shapes=False, distinct_colors=False):
    shapes = rng.sample(SHAPES, n) if distinct_shapes else [rng.choice(SHAPES) for _ in range(n)]
    colors = rng.sample(list(COLORS), n) if distinct_colors else [rng.choice(list(COLORS)) for _ in range(n)]
    return [dict(shape=s, color=c, size=rng.choice(list(SIZES))) for s, c in zip(shapes, colors)]


def at(o, cx, cy):
    """Put object o at the centre of token cell (cx, cy)."""
    o["x"], o["y"] = cx * CELL + CELL // 2, cy * CELL + CELL // 2
    return o


def place(rng, objs, W, H, min_dx=0):
    """Put each object at the centre of its own random 32-px cell of the token grid; False if they do not fit.
    Toy simplification (a deviation from natural images): one object per visual token, so a few-M-parameter
    model learns the world in minutes; relations between objects become relations between tokens, which is
    exactly what Native-RoPE's (h, w) indices and the mixed mask are for. min_dx > 0: distinct columns."""
    cells = [(cx, cy) for cy in range(H // CELL) for cx in range(W // CELL)]
    rng.shuffle(cells)
    used_cols = set()
    for o in objs:
        for k, (cx, cy) in enumerate(cells):
            if not (min_dx and cx in used_cols):
                break
        else:
            return False
        cells.pop(k)
        used_cols.add(cx)
        at(o, cx, cy)
    return True


def layout(rng, objs, min_dx=0, ok=lambda objs: True):
    """Pick a canvas (sides from SIDES, so any aspect from 2.5:1 to 1:2.5) and positions; -> (W, H)."""
    for attempt in range(200):
        W, H = (rng.choice(SIDES), rng.choice(SIDES)) if attempt < 100 else (160, 160)
        if place(rng, objs, W, H, min_dx) and ok(objs):
            return W, H
    raise RuntimeError("ShapesWorld could not place the objects")  # not reached with these sizes


@lru_cache(maxsize=8)
def font(size):
    return ImageFont.load_default(size=size)  # Pillow's built-in scalable font: no file needed


def draw(W, H, objs, word=None):
    img = Image.new("RGB", (W, H), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objs:
        x, y, r = o["x"], o["y"], SIZES[o["size"]]
        # a dark outline: on the grey background the four colours lie on all sides of it, so only the outline gives
        # every shape the same contour whatever its colour (EXPERIMENTS.md, section 'Earlier findings')
        kw = dict(fill=COLORS[o["color"]], outline=INK, width=2)
        if o["shape"] == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], **kw)
        elif o["shape"] == "square":
            d.rectangle([x - r, y - r, x + r, y + r], **kw)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], **kw)
    if word:
        d.text(word["xy"], word["text"], fill=INK, font=font(word["size"]))
    return img


def name(o):
    return f"{o['size']} {o['color']} {o['shape']}"


def cell(o):
    """An object's token cell as '(column, row)', counted from the top left."""
    return f"({o['x'] // CELL}, {o['y'] // CELL})"


def caption_of(objs, cells=False):
    """'big red circle, small blue square', left to right; cells=True: 'big red circle at (0, 1), ...'."""
    objs = sorted(objs, key=lambda o: (o["x"], o["y"]))
    return ", ".join(name(o) + (f" at {cell(o)}" if cells else "") for o in objs)


def moved(path, d):
    """The answer to 'Which way does the shape move?' in two steps, the places first: '(2, 0) to (2, 2): down'.
    Asked for the word alone, the toy learns the direction in some seeds only; it reads one shape's cell reliably
    and decides from two cells it has written out (EXPERIMENTS.md, section 'Relations in the default's budget',
    'Places first'). score() scores the word after ': '."""
    return f"{cell(path[0])} to {cell(path[-1])}: {d}"


def final(answer):
    """The word an answer ends with: all of it, or what follows the places (moved())."""
    return answer.rsplit(": ", 1)[-1]


def gen_caption(rng, cells=False):
    """cells=True is 'grounding', training only: 'Describe the image with positions.' -> 'big red circle at (0, 1),
    small blue square at (2, 3)', in pretrain, where it teaches the cells video_dir's answer writes."""
    objs = new_objects(rng, rng.randint(1, 4))
    W, H = layout(rng, objs, min_dx=8)  # left-to-right order must be visible
    q = "<image>Describe the image with positions." if cells else "<image>Describe the image."
    return [draw(W, H, objs)], [(q, caption_of(objs, cells))]


def gen_caption_rows(rng):
    """Training only: the caption read top to bottom, every object in its own row. Captions list objects left to
    right, which teaches columns and nothing teaches rows; these do (EXPERIMENTS.md, section 'Earlier findings')."""
    objs = new_objects(rng, rng.randint(1, 4))
    W, H = layout(rng, objs, ok=lambda os_: all(abs(a["y"] - b["y"]) >= 8 for a, b in combinations(os_, 2)))
    return [draw(W, H, objs)], [("<image>Describe the image from top to bottom.",
                                 ", ".join(name(o) for o in sorted(objs, key=lambda o: o["y"])))]


def gen_color(rng):
    objs = new_objects(rng, rng.randint(1, 3), distinct_shapes=True)  # "the circle" is unique
    W, H = layout(rng, objs)
    return [draw(W, H, objs)], [(f"<image>What color is the {objs[0]['shape']}?", objs[0]["color"])]


def gen_shape(rng):
    objs = new_objects(rng, rng.randint(1, 3), distinct_colors=True)  # "the red one" is unique
    W, H = layout(rng, objs)
    return [draw(W, H, objs)], [(f"<image>What shape is the {objs[0]['color']} one?", objs[0]["shape"])]


def gen_count(rng):
    objs = new_objects(rng, rng.randint(1, 4))
    W, H = layout(rng, objs)
    return [draw(W, H, objs)], [("<image>How many shapes are there?", str(len(objs)))]


def spatial_qa(a, b, axis):
    if axis == "lr":
        return f"Is the {a['shape']} left or right of the {b['shape']}?", "left" if a["x"] < b["x"] else "right"
    return f"Is the {a['shape']} above or below the {b['shape']}?", "above" if a["y"] < b["y"] else "below"


def gen_spatial(rng, n=0):
    objs = new_objects(rng, n or rng.randint(2, 3), distinct_shapes=True)
    axis = rng.choice(("lr", "ab"))
    k = "x" if axis == "lr" else "y"
    W, H = layout(rng, objs, ok=lambda o: abs(o[0][k] - o[1][k]) >= 16)  # a clear gap on the asked axis
    a, b = objs[0], objs[1]
    if (a[k] < b[k]) != (rng.random() < 0.5):  # which one is named first decides the answer: balance it
        a, b = b, a
    q, ans = spatial_qa(a, b, axis)
    return [draw(W, H, objs)], [("<image>" + q, ans)]


def pick_qa(a, b, axis, far):
    """"Which is further left, the a or the b?" -> a shape: the relation as a choice between two named objects,
    the form captions already teach (their order is left to right). far: 0 = left/higher, 1 = right/lower."""
    k = "x" if axis == "lr" else "y"
    lo, hi = (a, b) if a[k] < b[k] else (b, a)
    word = ("further left", "further right") if axis == "lr" else ("higher", "lower")
    return f"Which is {word[far]}, the {a['shape']} or the {b['shape']}?", (lo, hi)[far]["shape"]


def gen_spatial_pick(rng, n=0):
    objs = new_objects(rng, n or rng.randint(2, 3), distinct_shapes=True)
    axis = rng.choice(("lr", "ab"))
    k = "x" if axis == "lr" else "y"
    W, H = layout(rng, objs, ok=lambda o: abs(o[0][k] - o[1][k]) >= 16)
    a, b = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])  # the answer is named first half the time
    q, ans = pick_qa(a, b, axis, rng.randrange(2))
    return [draw(W, H, objs)], [("<image>" + q, ans)]


def gen_spatial_two(rng):
    """Training only: a spatial question of either form about a scene of exactly two objects, no distractor: with
    two, relations leave their plateau at chance much sooner. Held-out sets keep 2-3 objects. Both axes equally:
    asking above/below more did not teach rows and lost left/right (EXPERIMENTS.md, section 'Earlier findings')."""
    return (gen_spatial if rng.random() < 0.5 else gen_spatial_pick)(rng, n=2)


def gen_spatial_yn_two(rng):
    """Training only (the toy's spatial stage): the yes/no form alone, about two objects, which a model that knows
    rows learns quickly, where inside a mixture it does not (EXPERIMENTS.md, section 'A spatial curriculum')."""
    return gen_spatial(rng, n=2)


def gen_size(rng):
    objs = new_objects(rng, rng.randint(2, 3), distinct_shapes=True)
    objs[0]["size"], objs[1]["size"] = "big", "small"
    W, H = layout(rng, objs)
    first, second = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
    return [draw(W, H, objs)], [(f"<image>Which is bigger, the {first['shape']} or the {second['shape']}?",
                                 objs[0]["shape"])]


def gen_read(rng):
    text, size = rng.choice(WORDS), rng.choice((20, 24, 28))
    x0, y0, x1, y1 = font(size).getbbox(text)
    W = rng.choice([s for s in SIDES if s >= x1 + 8])
    H = rng.choice([s for s in SIDES if s >= y1 + 8])
    xy = (rng.randint(2, W - x1 - 4), rng.randint(2 - y0, H - y1 - 4))
    return [draw(W, H, [], dict(text=text, size=size, xy=xy))], [("<image>What word is written?", text)]


def gen_multi_count(rng):
    a, b = rng.sample((1, 2, 3, 4), 2)
    imgs = []
    for n in (a, b):
        objs = new_objects(rng, n)
        imgs.append(draw(*layout(rng, objs), objs))
    return imgs, [("<image><image>Which image has more shapes, the first or the second?",
                   "first" if a > b else "second")]


def gen_multi_change(rng):
    obj = new_objects(rng, 1)[0]
    obj["size"] = "big"  # place as big so a size change still fits
    W, H = layout(rng, [obj])
    obj["size"] = rng.choice(list(SIZES))
    change, new = rng.choice(CHANGES), dict(obj)
    if change == "color":
        new["color"] = rng.choice([c for c in COLORS if c != obj["color"]])
    elif change == "shape":
        new["shape"] = rng.choice([s for s in SHAPES if s != obj["shape"]])
    elif change == "size":
        new["size"] = "small" if obj["size"] == "big" else "big"
    else:
        while abs(new["x"] - obj["x"]) + abs(new["y"] - obj["y"]) < 24:
            place(rng, [new], W, H)
    return [draw(W, H, [obj]), draw(W, H, [new])], [("<image><image>What changed?", change)]


def gen_video_dir(rng):
    n, obj = rng.randint(3, 4), new_objects(rng, 1)[0]  # n square frames of n x n cells: aspect gives nothing away
    S, d = n * CELL, rng.choice(DIRS)
    other = rng.randrange(n) * CELL + CELL // 2
    path = []
    for i in range(n):  # one cell further each frame
        p = (i if d in ("right", "down") else n - 1 - i) * CELL + CELL // 2
        path.append(dict(obj, x=p, y=other) if d in ("left", "right") else dict(obj, x=other, y=p))
    return [draw(S, S, [o]) for o in path], [(video_prompt(list(range(n)), n) + "Which way does the shape move?",
                                             moved(path, d))]


def gen_video_appear(rng):
    obj, k, S = new_objects(rng, 1)[0], rng.randint(1, 4), rng.choice((64, 96))  # small frames: 4-9 tokens
    place(rng, [obj], S, S)
    frames = [draw(S, S, [obj] if i + 1 >= k else []) for i in range(4)]
    return frames, [(video_prompt([0, 1, 2, 3], 4) + "In which frame does the shape appear?", str(k))]


def scene_questions(objs):
    """Every question about one scene that has a single right answer, grouped by kind: {kind: [(q, a)]}."""
    shapes, colors = [o["shape"] for o in objs], [o["color"] for o in objs]
    named = [o for o in objs if shapes.count(o["shape"]) == 1]  # "the circle" must name one object
    qa = {"count": [("How many shapes are there?", str(len(objs)))], "caption": [("Describe the image.", caption_of(objs))],
          "color": [(f"What color is the {o['shape']}?", o["color"]) for o in named],
          "shape": [(f"What shape is the {o['color']} one?", o["shape"]) for o in objs if colors.count(o["color"]) == 1],
          "spatial": [], "spatial_pick": [], "size": []}
    for a in named:
        for b in named:
            if a is b:
                continue
            for axis, k in (("lr", "x"), ("ab", "y")):
                if abs(a[k] - b[k]) >= 16:  # the same clear gap gen_spatial asks for
                    qa["spatial"].append(spatial_qa(a, b, axis))
                    qa["spatial_pick"].append(pick_qa(a, b, axis, len(qa["spatial"]) % 2))
            if a["size"] != b["size"]:
                big = a if a["size"] == "big" else b
                qa["size"].append((f"Which is bigger, the {a['shape']} or the {b['shape']}?", big["shape"]))
    return {k: v for k, v in qa.items() if v}


def gen_multi_turn(rng):
    """Three to five questions of different kinds about one scene, in one conversation. Many answers per
    image and per prompt token: the toy's cheapest source of visual supervision (midtrain and sft)."""
    objs = new_objects(rng, rng.randint(1, 4))
    W, H = layout(rng, objs, min_dx=8)
    qa = scene_questions(objs)
    turns = [rng.choice(qa[k]) for k in rng.sample(sorted(qa), min(len(qa), rng.randint(3, 5)))]
    return [draw(W, H, objs)], [("<image>" + turns[0][0], turns[0][1])] + turns[1:]


def gen_text(rng):
    """Text-only questions in the same templates and answer vocabulary, with the scene told in words."""
    kind = rng.randrange(8)
    objs = new_objects(rng, rng.randint(2, 3), distinct_shapes=True, distinct_colors=True)
    a, b = objs[0], objs[1]
    said = "There is a " + " and a ".join(name(o) for o in objs) + "."
    if kind == 0:
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        return [], [(f"What is {x} + {y}?", str(x + y))]
    if kind == 1:
        return [], [(f"{said} What color is the {a['shape']}?", a["color"])]
    if kind == 2:
        return [], [(f"{said} What shape is the {a['color']} one?", a["shape"])]
    if kind == 3:
        n = rng.randint(1, 4)
        return [], [("I see " + ", ".join("a " + rng.choice(SHAPES) for _ in range(n)) + ". How many shapes are there?",
                     str(n))]
    if kind == 4:
        a["size"], b["size"] = "big", "small"
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        return [], [(f"The {a['shape']} is big and the {b['shape']} is small. Which is bigger, the "
                     f"{first['shape']} or the {second['shape']}?", a["shape"])]
    if kind == 5:
        rel = rng.choice(("left of", "right of", "above", "below"))
        flip = {"left of": "right", "right of": "left", "above": "below", "below": "above"}[rel]
        q = (f"Is the {b['shape']} left or right of the {a['shape']}?" if rel in ("left of", "right of")
             else f"Is the {b['shape']} above or below the {a['shape']}?")
        return [], [(f"The {a['shape']} is {rel} the {b['shape']}. {q}", flip)]
    if kind == 6:
        d = rng.choice(DIRS)
        src, dst = {"left": ("right", "left"), "right": ("left", "right"), "up": ("bottom", "top"),
                    "down": ("top", "bottom")}[d]
        return [], [(f"A {name(a)} goes from the {src} to the {dst}. Which way does the shape move?", d)]
    x, y = rng.sample((1, 2, 3, 4), 2)
    return [], [(f"The first image has {x} shapes and the second has {y}. Which image has more shapes, the "
                 f"first or the second?", "first" if x > y else "second")]


GENERATORS = {"caption": gen_caption, "grounding": lambda rng: gen_caption(rng, cells=True),
              "caption_rows": gen_caption_rows, "color": gen_color, "shape": gen_shape, "count": gen_count,
              "spatial": gen_spatial, "spatial_pick": gen_spatial_pick,
              "spatial_two": gen_spatial_two, "spatial_yn_two": gen_spatial_yn_two, "size": gen_size,
              "read": gen_read, "multi_count": gen_multi_count, "multi_change": gen_multi_change,
              "video_dir": gen_video_dir, "video_appear": gen_video_appear, "multi_turn": gen_multi_turn,
              "text": gen_text}


# -----------------------------------------------------------------------------
# Probe families (ablate.py): where the paper's position claims predict a difference. Canvases of 2-8 token cells a
# side, chosen independently, so a grid row has a different number of tokens in almost every image: under 1D-RoPE
# "same column" and "one row down" are offsets that change with the width; under Native-RoPE they are the w and h
# indices themselves. The predictions, written before the first run, are in EXPERIMENTS.md ("The probe ablation").
PROBE_CELLS = range(2, 9)


def probe_canvas(rng, lo=2):
    return rng.choice([c for c in PROBE_CELLS if c >= lo]), rng.choice([c for c in PROBE_CELLS if c >= lo])


def gen_where(rng):
    """'Where is the shape?' -> top left | top right | bottom left | bottom right; never a middle row or column."""
    w, h = probe_canvas(rng)
    cx = rng.choice([c for c in range(w) if 2 * c + 1 != w])
    cy = rng.choice([c for c in range(h) if 2 * c + 1 != h])
    o = at(new_objects(rng, 1)[0], cx, cy)
    ans = ("top" if 2 * cy < h else "bottom") + " " + ("left" if 2 * cx < w else "right")
    return [draw(w * CELL, h * CELL, [o])], [("<image>Where is the shape?", ans)]


def wide_canvas(rng):
    """2-8 x 2-8 token cells, chosen independently (aspect 4:1 to 1:4), so two shapes can differ on both axes."""
    return rng.randint(2, 8), rng.randint(2, 8)


def gen_far(rng, axis, pick=False, wide=False, far=None):
    """A relation between two shapes in different rows and different columns (of a 3-8 x 3-8 canvas; wide=True:
    wide_canvas). pick=True asks it as pick_qa does: 'Which is further left, the circle or the square?' -> a shape;
    far: 0 = always left / higher, 1 = always right / lower, None = either."""
    w, h = wide_canvas(rng) if wide else probe_canvas(rng, lo=3)
    a, b = new_objects(rng, 2, distinct_shapes=True)
    cells = [(x, y) for x in range(w) for y in range(h)]
    (ax, ay) = rng.choice(cells)
    (bx, by) = rng.choice([(x, y) for x, y in cells if x != ax and y != ay])
    at(a, ax, ay), at(b, bx, by)
    q, ans = pick_qa(a, b, axis, rng.randrange(2) if far is None else far) if pick else spatial_qa(a, b, axis)
    return [draw(w * CELL, h * CELL, [a, b])], [("<image>" + q, ans)]


def gen_move(rng, frames=3, sides=(3, 5)):
    """Three frames of 3-5 x 3-5 cells, one shape moving one cell a frame: left | right | up | down."""
    w, h, d, obj = rng.randint(*sides), rng.randint(*sides), rng.choice(DIRS), new_objects(rng, 1)[0]
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[d]
    m = frames - 1  # cells moved in all
    start = lambda n, step: rng.randrange(m, n) if step < 0 else rng.randrange(n - m) if step > 0 else rng.randrange(n)
    x0, y0 = start(w, dx), start(h, dy)
    path = [at(dict(obj), x0 + i * dx, y0 + i * dy) for i in range(frames)]
    q = video_prompt(list(range(frames)), frames) + "Which way does the shape move?"
    return [draw(w * CELL, h * CELL, [o]) for o in path], [(q, moved(path, d))]


def gen_color_big(rng):
    """The control: 'What color is the circle?' on the same canvases; no position needed."""
    w, h = probe_canvas(rng)
    objs = new_objects(rng, rng.randint(1, 3), distinct_shapes=True)
    for o, (x, y) in zip(objs, rng.sample([(x, y) for x in range(w) for y in range(h)], len(objs))):
        at(o, x, y)
    return [draw(w * CELL, h * CELL, objs)], [(f"<image>What color is the {objs[0]['shape']}?", objs[0]["color"])]


PROBE_FAMILIES = {"where": (("top left", "top right", "bottom left", "bottom right"), 1 / 4),
                  "lr_far": (("left", "right"), 1 / 2), "ab_far": (("above", "below"), 1 / 2),
                  "move": (DIRS, 1 / 4), "color_big": (tuple(COLORS), 1 / 4)}
PROBE_CONTROLS = ("color_big",)
CHANCE.update({f: c for f, (_, c) in PROBE_FAMILIES.items()})
GENERATORS.update(where=gen_where, lr_far=lambda rng: gen_far(rng, "lr"), ab_far=lambda rng: gen_far(rng, "ab"),
                  move=gen_move, color_big=gen_color_big)

# The position probe (ablate.py): from scratch, one model per question, canvases of 2-8 x 2-8 cells. "left" and
# "higher" (one direction each: find the extreme shape) are learnt in a few hundred steps; a model asked both must
# also read which one (~4x the steps), and the yes/no form needs a comparison of two named shapes, not learnt in
# 1,000 steps (EXPERIMENTS.md, section 'The position probe').
POSITION_PROBES = {"left": (lambda rng: gen_far(rng, "lr", pick=True, wide=True, far=0), SHAPES),
                   "higher": (lambda rng: gen_far(rng, "ab", pick=True, wide=True, far=0), SHAPES),
                   "pick_lr": (lambda rng: gen_far(rng, "lr", pick=True, wide=True), SHAPES),
                   "pick_ud": (lambda rng: gen_far(rng, "ab", pick=True, wide=True), SHAPES),
                   "yesno_lr": (lambda rng: gen_far(rng, "lr", wide=True), ("left", "right")),
                   "yesno_ud": (lambda rng: gen_far(rng, "ab", wide=True), ("above", "below")),
                   "move2": (lambda rng: gen_move(rng, frames=2, sides=(2, 8)), DIRS)}
GENERATORS.update({f: g for f, (g, _) in POSITION_PROBES.items()})
CHANCE.update({f: 1 / 2 for f in POSITION_PROBES}, move2=1 / 4)


class ShapesWorld:
    """Deterministic, indexable, endless: sample i of (stage, split, seed) is always the same sample.

        w = ShapesWorld("midtrain")   # w[i] -> sample dict; w.example(i) -> PIL images + question/answer turns
        ShapesWorld(split="val").eval_prompts(40)   # 40 held-out prompts per family, for score()
    """

    def __init__(self, stage="midtrain", split="train", enc=None, min_pixels=64 * 64, max_pixels=256 * 256, seed=0,
                 extra=None, places=True):
        assert stage in MIXES, f"stage must be one of {', '.join(MIXES)}, got {stage!r}"
        assert split in ("train", "val"), f"split must be train or val, got {split!r}"
        self.stage, self.split, self.enc = stage, split, enc or get_tokenizer("shapes")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.seed = VAL_SEED if split == "val" else seed
        self.families, self.weights = zip(*{**MIXES[stage], **(extra or {})}.items())  # extra: added weights
        self.places = places  # False: every answer is its last word (final()), as before places came first

    def __len__(self):
        return 2 ** 31  # endless: the loader draws indices at random

    def example(self, i, family=None):
        """-> {family, images: [PIL], turns: [(question, answer)]}; family=None draws from the stage mixture."""
        rng = random.Random(f"shapes/{self.seed}/{family}/{i}")  # str seeds hash the same in every process
        family = family or rng.choices(self.families, self.weights)[0]
        images, turns = GENERATORS[family](rng)
        if not self.places:
            turns = [(q, final(a)) for q, a in turns]
        return {"family": family, "images": images, "turns": turns}

    def encode(self, ex):
        images = [to_tensor(im, self.min_pixels, self.max_pixels) for im in ex["images"]]
        msgs = [m for q, a in ex["turns"] for m in (("user", q), ("assistant", a))]
        return {**encode_chat(self.enc, msgs, images), "family": ex["family"]}

    def __getitem__(self, i):
        return self.encode(self.example(i))

    def prompt(self, ex):
        """build_prompt for one example: -> {input_ids, images, answer, family} (the last turn's answer)."""
        *done, (q, answer) = ex["turns"]
        msgs = [m for qq, a in done for m in (("user", qq), ("assistant", a))] + [("user", q)]
        images = [to_tensor(im, self.min_pixels, self.max_pixels) for im in ex["images"]]
        axis = {"axis": axis_of(q)} if ex["family"] in RELATION_FAMILIES else {}
        return {**build_prompt(self.enc, msgs, images), "answer": answer, "family": ex["family"], **axis}

    def eval_prompts(self, n, families=None):
        """n prompts per family (all scored families by default), from this split."""
        return [self.prompt(self.example(i, f)) for f in (families or FAMILIES) for i in range(n)]


def axis_of(question):
    """The axis a relation question asks about, from its words: 'left/right' or 'above/below'."""
    return "left/right" if "left" in question or "right" in question else "above/below"


def score(preds):
    """preds: [(prompt dict with 'family' and 'answer', predicted text)] -> {family: exact-match accuracy}. An
    answer with its places first (moved()) is scored on the word after them, and '<family> (whole)' on all of it.
    A relation question (its prompt has an 'axis') also counts in '<family> (left/right)' or '(above/below)': the
    family's mean hides a model that knows one axis and guesses the other (EXPERIMENTS.md, 'Relations in the
    default's budget')."""
    hits = {}
    for p, text in preds:
        f, text, answer = p["family"], text.strip(), p["answer"]
        if final(answer) == answer:  # a word, or a caption: all of it
            hits.setdefault(f, []).append(text == answer)
        else:  # places, then the word
            hits.setdefault(f, []).append(final(text) == final(answer))
            hits.setdefault(f + " (whole)", []).append(text == answer)
        if p.get("axis"):
            hits.setdefault(f"{f} ({p['axis']})", []).append(hits[f][-1])
    first = {f: i for i, f in enumerate(hits)}  # families in the order first seen, each followed by its parts
    order = sorted(hits, key=lambda k: (first[k.split(" (")[0]], k != k.split(" (")[0], k))
    return {f: sum(hits[f]) / len(hits[f]) for f in order}


# -----------------------------------------------------------------------------


def main(out="shapes_examples", n=1):
    """Save one example per family (images side by side) and its prompt/answer, for eyeballing and the README."""
    os.makedirs(out, exist_ok=True)
    w = ShapesWorld("sft", "val")
    lines = []
    for f in GENERATORS:
        for i in range(n):
            ex = w.example(i, f)
            if ex["images"]:
                W = sum(im.width for im in ex["images"]) + 8 * (len(ex["images"]) - 1)
                sheet = Image.new("RGB", (W, max(im.height for im in ex["images"])), (255, 255, 255))
                x = 0
                for im in ex["images"]:
                    sheet.paste(im, (x, 0))
                    x += im.width + 8
                sheet.save(os.path.join(out, f"{f}_{i}.png"))
            n_tok = len(w.encode(ex)["input_ids"])
            lines.append(f"## {f}_{i} ({n_tok} tokens with the toy tokenizer)\n" +
                         "\n".join(f"Q: {q}\nA: {a}" for q, a in ex["turns"]))
    with open(os.path.join(out, "prompts.txt"), "w") as fh:
        fh.write("\n\n".join(lines) + "\n")
    print(f"wrote {len(lines)} examples to {out}/")


# the families a benchmark row can hold: one question about one or two images (no video, no multi-turn)
TSV_FAMILIES = IMAGE_FAMILIES + ("multi_count", "multi_change")


def export_tsv(path, n=40):
    """The held-out prompts train.py's evaluation scores (n per family) as a benchmark TSV in VLMEvalKit's layout,
    for eval.py: index, image (base64 PNG; two images as a list), question (its <image> placeholders dropped:
    eval.py puts the images first, as the toy trained), answer, category (the family)."""
    import base64
    import csv
    import io

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    w = ShapesWorld("sft", "val")
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t")
        out.writerow(["index", "image", "question", "answer", "category"])
        for k, fam in enumerate(TSV_FAMILIES):
            for i in range(n):
                ex = w.example(i, fam)
                (q, a), = ex["turns"]
                imgs = [b64(im) for im in ex["images"]]
                out.writerow([k * 10_000 + i, imgs[0] if len(imgs) == 1 else repr(imgs), q.replace("<image>", ""), a,
                              fam])
    print(f"wrote {path}: {n} held-out questions for each of {len(TSV_FAMILIES)} families")


if __name__ == "__main__":
    import sys
    opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    if len(opts) != len(sys.argv) - 1 or not set(opts) <= {"tsv", "n"} or not opts.get("n", "1").isdigit():
        sys.exit("usage: python shapes.py  (examples to shapes_examples/)  |  python shapes.py --tsv=FILE.tsv [--n=40]")
    if "tsv" in opts:
        export_tsv(opts["tsv"], int(opts.get("n", 40)))
    else:
        main()
