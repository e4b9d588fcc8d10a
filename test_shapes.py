"""
Tests for shapes.py, ShapesWorld: what it draws is what its answers say; its questions are balanced. CPU, seconds.

    python -m pytest -q test_shapes.py
"""
import math
import re
from collections import Counter

import numpy as np
import pytest

import data
import shapes
from tokenizer import get_tokenizer


def blobs(img):
    """Connected blobs of non-background pixels (4-neighbour flood fill), each as (ys, xs) arrays."""
    a = np.asarray(img)
    fg = (a != np.array(shapes.BACKGROUND)).any(-1)
    seen, out = np.zeros_like(fg), []
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < fg.shape[0] and 0 <= xx < fg.shape[1] and fg[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pts).T)
    return out


def components(img):
    return len(blobs(img))


def centroid(img):
    a = np.asarray(img)
    ys, xs = np.nonzero((a != np.array(shapes.BACKGROUND)).any(-1))
    return xs.mean(), ys.mean()


def test_shapes_background_and_outline():
    """The background normalises to ~0 (a flat light one was a large constant input to the patch conv), and every
    shape is outlined in INK around its fill colour, whatever the colour (one contour per shape on the grey)."""
    blank = data.to_tensor(shapes.draw(64, 64, []), 64 * 64, 64 * 64)
    assert blank.abs().max() < 0.05, blank.abs().max()
    for shape in shapes.SHAPES:
        for color in shapes.COLORS:
            img = np.asarray(shapes.draw(64, 64, [dict(shape=shape, color=color, size="big", x=32, y=32)]))
            assert tuple(img[36, 32]) == shapes.COLORS[color], (shape, color)  # inside (below centre: triangle)
            row = img[44]                                         # a row through the lower part of every shape
            edge = np.nonzero((row != np.array(shapes.BACKGROUND)).any(-1))[0][0]  # its first non-background pixel
            assert tuple(row[edge]) == shapes.INK, (shape, color, tuple(row[edge]))


def test_shapes_answers_match_pixels():
    """Counts equal the blobs drawn, colours are present, directions equal the motion, appearance frames
    are the first non-empty ones, multi-image counts compare the blobs."""
    w = shapes.ShapesWorld(split="val")
    for i in range(30):
        ex = w.example(i, "count")
        assert components(ex["images"][0]) == int(ex["turns"][0][1])
        ex = w.example(i, "color")
        rgb = np.asarray(ex["images"][0]).reshape(-1, 3)
        assert (rgb == shapes.COLORS[ex["turns"][0][1]]).all(-1).sum() > 50
        ex = w.example(i, "video_dir")
        (x0, y0), (x1, y1) = centroid(ex["images"][0]), centroid(ex["images"][-1])
        dx, dy = x1 - x0, y1 - y0
        want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert want == shapes.final(ex["turns"][0][1]) and max(abs(dx), abs(dy)) > 20
        ex = w.example(i, "video_appear")
        first = next(k for k, im in enumerate(ex["images"]) if components(im) > 0)
        assert str(first + 1) == ex["turns"][0][1]
        ex = w.example(i, "multi_count")
        a, b = map(components, ex["images"])
        assert ex["turns"][0][1] == ("first" if a > b else "second")
        ex = w.example(i, "spatial")
        assert ex["turns"][0][1] in ex["turns"][0][0]
        ex = w.example(i, "text")
        assert ex["images"] == [] and ex["turns"][0][1]


FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # how much of its bounding box each shape fills


def shapes_found(img):
    """[(shape, x, y)] of the blobs drawn, each shape told apart by how much of its bounding box it fills."""
    out = []
    for ys, xs in blobs(img):
        ratio = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = min(FILL, key=lambda s: abs(FILL[s] - ratio))
        out.append((shape, (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2))
    return out


@pytest.mark.parametrize("family,n_answers", [("spatial_two", 7), ("spatial_yn_two", 4)])
def test_spatial_two_matches_pixels(family, n_answers):
    """The training-only two-object relations: exactly two blobs, and the answer agrees with where the named
    shapes are drawn, both forms (spatial_two) or the yes/no form alone (spatial_yn_two), balanced."""
    w, answers = shapes.ShapesWorld(), Counter()
    for i in range(400):
        ex = w.example(i, family)
        (q, a), = ex["turns"]
        q = q.removeprefix("<image>")
        found = {s: (x, y) for s, x, y in shapes_found(ex["images"][0])}
        assert len(found) == 2, (i, q, found)
        n1, n2 = re.findall(r"the (circle|square|triangle)", q)
        k = 0 if ("left" in q.split(",")[0] or "right" in q.split(",")[0]) else 1  # axis the question asks about
        lo, hi = sorted((n1, n2), key=lambda s: found[s][k])
        if q.startswith("Is the"):
            want = ("left" if found[n1][0] < found[n2][0] else "right") if k == 0 else \
                   ("above" if found[n1][1] < found[n2][1] else "below")
        else:
            want = lo if ("further left" in q or "higher" in q) else hi
        assert a == want, (i, q, a, found)
        answers[a] += 1
    assert len(answers) == n_answers, answers  # left/right/above/below (and the three shapes)
    for x, y in (("left", "right"), ("above", "below")):  # balanced within an axis: a blind guess gets half
        assert 0.5 < answers[x] / answers[y] < 2, answers


def test_caption_rows_match_pixels():
    """The training-only top-to-bottom caption names every blob drawn, in the order of their rows."""
    w, lengths = shapes.ShapesWorld(), Counter()
    for i in range(200):
        ex = w.example(i, "caption_rows")
        (q, a), = ex["turns"]
        assert q == "<image>Describe the image from top to bottom."
        found = sorted(shapes_found(ex["images"][0]), key=lambda f: f[2])
        assert [s for s, _, _ in found] == [item.split()[-1] for item in a.split(", ")], (i, a, found)
        assert all(y1 - y0 >= 8 for (_, _, y0), (_, _, y1) in zip(found, found[1:])), (i, found)
        lengths[len(found)] += 1
    assert set(lengths) == {1, 2, 3, 4}, lengths


def template(q):
    """A question with its object names blanked: the text a blind model sees, up to the names."""
    return re.sub(r"\b(" + "|".join(list(shapes.COLORS) + list(shapes.SHAPES)) + r")\b", "X", q.split("\n")[-1])


def test_answer_balance():
    """Within every question template each answer is about equally likely, and in 'which of the two named'
    questions the first-named one is the answer half the time: a blind model scores at chance."""
    w = shapes.ShapesWorld()
    for fam, (answers, chance) in shapes.FAMILIES.items():
        if answers is None:
            continue
        by_q, first = {}, []
        for i in range(400):
            q, a = w.example(i, fam)["turns"][0]
            a = shapes.final(a)  # the word after the places, where they come first
            by_q.setdefault(template(q), []).append(a)
            if fam in ("size", "spatial_pick"):
                first.append(q.index(a) < q.rindex(" the "))
        for t, got in by_q.items():
            c = Counter(got)
            k = len(c)
            assert k >= 2 and set(c) <= set(answers), (fam, t, c)
            assert min(c.values()) > 0.6 * len(got) / k and max(c.values()) < 1.4 * len(got) / k, (fam, t, c)
        if fam in ("size", "spatial_pick"):
            assert 0.4 < sum(first) / len(first) < 0.6
        elif fam != "spatial":  # spatial: the template names two options, chance 1/2
            assert abs(1 / len(Counter(a for v in by_q.values() for a in v)) - chance) < 1e-9, fam


def test_stage_mixtures_and_eval():
    """llm is text only, pretrain mostly captions, midtrain every family and conversations; held-out prompts end in the
    assistant header and score() gives per-family exact match."""
    enc = get_tokenizer("bytes")
    fams = {s: Counter(shapes.ShapesWorld(s).example(i)["family"] for i in range(300)) for s in shapes.MIXES}
    assert set(fams["llm"]) == {"text"}
    assert set(fams["pretrain"]) == {"caption", "text"} and 0.2 < fams["pretrain"]["text"] / 300 < 0.4
    assert set(fams["midtrain"]) == set(shapes.FAMILIES) | {"multi_turn", "spatial_two"}
    assert "multi_turn" in fams["sft"]
    assert set(fams["spatial"]) == {"spatial_yn_two"}
    # --spatial_curriculum: its weights are added to a stage's mixture (or replace one, as sft's spatial)
    cur = {s: Counter(shapes.ShapesWorld(s, extra=shapes.SPATIAL_CURRICULUM[s]).example(i)["family"] for i in range(600))
           for s in ("pretrain", "sft")}
    assert set(cur["pretrain"]) == {"caption", "caption_rows", "text"}
    assert 0.15 < cur["pretrain"]["caption_rows"] / 600 < 0.3
    assert cur["sft"]["spatial"] / 600 > 2 * fams["sft"]["spatial"] / 300 and "spatial_yn_two" in cur["sft"]
    val = shapes.ShapesWorld(split="val", enc=enc)
    prompts = val.eval_prompts(3)
    assert len(prompts) == 3 * len(shapes.FAMILIES)
    tail = [257] + enc.encode("assistant\n")
    assert all(p["input_ids"][-len(tail):] == tail for p in prompts)
    again = shapes.ShapesWorld(split="val", enc=enc, seed=123).eval_prompts(3)  # the held-out split ignores the seed
    assert [p["input_ids"] for p in again] == [p["input_ids"] for p in prompts]
    acc = shapes.score([(p, p["answer"] if p["family"] == "count" else " nope ") for p in prompts])
    assert acc["count"] == 1.0 and acc["color"] == 0.0
    assert set(acc) - set(shapes.FAMILIES) <= {"video_dir (whole)", *(f"{f} ({a})" for f in ("spatial", "spatial_pick")
                                                                      for a in ("left/right", "above/below"))}


def test_relations_are_scored_per_axis():
    """spatial and spatial_pick prompts carry the axis they ask about (the yes/no answer's own word, or the pick
    question's 'higher'/'lower', says which), and score() reports each axis right after the family: a model right on
    left/right and wrong on above/below scores 100 and 0 there, where the family's mean alone says ~50."""
    w = shapes.ShapesWorld(split="val")
    for fam in ("spatial", "spatial_pick"):
        prompts = w.eval_prompts(40, families=[fam])
        for i, p in enumerate(prompts):
            q = w.example(i, fam)["turns"][-1][0]
            rows = p["answer"] in ("above", "below") if fam == "spatial" else ("higher" in q or "lower" in q)
            assert p["axis"] == ("above/below" if rows else "left/right"), (fam, q, p["axis"])
        assert {p["axis"] for p in prompts} == {"left/right", "above/below"}
        lr_only = [(p, p["answer"] if p["axis"] == "left/right" else "nope") for p in prompts]
        acc = shapes.score(lr_only)
        n_lr = sum(p["axis"] == "left/right" for p in prompts)
        assert acc[f"{fam} (left/right)"] == 1.0 and acc[f"{fam} (above/below)"] == 0.0
        assert acc[fam] == n_lr / len(prompts)
        assert list(acc) == [fam, f"{fam} (above/below)", f"{fam} (left/right)"]  # as the printed line reads
    assert "axis" not in w.prompt(w.example(0, "color"))  # other families: one score each, as before


def test_places_match_pixels():
    """video_dir and the move probe name the shape's (column, row) cell in the first and the last frame, as drawn,
    then the direction; captions with places name every object's cell; places=False leaves the one-word answer
    and the same images."""
    w, one = shapes.ShapesWorld(split="val"), shapes.ShapesWorld(split="val", places=False)
    cells = lambda img: [(int(x) // shapes.CELL, int(y) // shapes.CELL) for _, x, y in shapes_found(img)]
    said = lambda text: [tuple(map(int, c)) for c in re.findall(r"\((\d), (\d)\)", text)]
    for i in range(40):
        for fam in ("video_dir", "move"):
            ex, word = w.example(i, fam), one.example(i, fam)
            (q, a), = ex["turns"]
            assert said(a) == cells(ex["images"][0]) + cells(ex["images"][-1]) and " to " in a, (fam, i, a)
            assert word["turns"] == [(q, shapes.final(a))] and shapes.final(a) in shapes.DIRS, word["turns"]
            assert [im.tobytes() for im in word["images"]] == [im.tobytes() for im in ex["images"]]
        ex = w.example(i, "grounding")
        (q, a), = ex["turns"]
        by_x = sorted(shapes_found(ex["images"][0]), key=lambda f: f[1])
        assert q == "<image>Describe the image with positions."
        assert said(a) == [(int(x) // shapes.CELL, int(y) // shapes.CELL) for _, x, y in by_x], (i, a)
        assert [item.split(" at ")[0].split()[-1] for item in a.split("), ")] == [s for s, _, _ in by_x], (i, a)


def test_score_reads_the_word_after_the_places():
    """An answer with places first is scored on the word after them ('<family> (whole)': all of it); any other
    answer as a whole, so text before a ': ' is never forgiven there."""
    vd = {"family": "video_dir", "answer": "(2, 0) to (2, 2): down"}
    cap = {"family": "caption", "answer": "big red circle"}
    acc = shapes.score([(vd, "(2, 0) to (2, 3): down"), (vd, "down"), (vd, vd["answer"]), (vd, "(2, 0) to (2, 2): up"),
                        (cap, "x: big red circle")])
    assert acc == {"video_dir": 0.75, "video_dir (whole)": 0.25, "caption": 0.0}, acc
