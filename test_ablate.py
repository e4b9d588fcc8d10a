"""
Tests of the position probe (ablate.py's default), its task generators (shapes.POSITION_PROBES) and the patch
embedding's rotation switch (NEOConfig.patch_rope).

    python -m pytest -q test_ablate.py
"""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import ablate
import shapes
from neo import NEO, NEOConfig

TINY = dict(d_model=32, n_layer=1, n_pre_layers=1, n_head=2, n_kv_head=1, head_dim=16, d_mlp=64, vision_dim=16)


def test_patch_rope_off_changes_patch_tokens_only_there():
    """patch_rope=False skips the 2-D rotation in forward and forward_reference alike; on (the default) the
    model is NEO's, so the same weights give the same logits."""
    torch.manual_seed(0)
    on = NEO(NEOConfig(**TINY))
    off = NEO(NEOConfig(**TINY, patch_rope=False))
    off.load_state_dict(on.state_dict())
    img = torch.randn(3, 64, 96)  # 4 x 6 patches of 16 px: rows and columns past 0, where the rotation acts
    t_on, t_off = on.vision(img), off.vision(img)
    assert not torch.allclose(t_on, t_off, atol=1e-4)
    assert torch.allclose(t_off, off.vision.forward_reference(img), atol=1e-5)
    # by hand: without the rotation, the two convolutions alone
    pe, de = off.vision.patch_embedding, off.vision.dense_embedding
    want = de(torch.nn.functional.gelu(pe(img[None])))[0].flatten(1).T  # (N, d_model) row-major
    assert torch.allclose(t_off, want, atol=1e-5)
    explicit = NEO(NEOConfig(**TINY, patch_rope=True))
    explicit.load_state_dict(on.state_dict())
    ids = torch.tensor([[1, 259, *[261] * 6, 260, 2]])  # <img> + 2 x 3 visual tokens + </img>
    assert torch.equal(on(ids, [img])[0], explicit(ids, [img])[0])
    assert not torch.allclose(on(ids, [img])[0], off(ids, [img])[0], atol=1e-5)


# -----------------------------------------------------------------------------
# The generators, checked against the pixels they draw

def reference_counts():
    """Non-background pixels of each (shape, size) drawn alone in one cell: how the tests tell shapes apart."""
    out = {}
    for s in shapes.SHAPES:
        for z in shapes.SIZES:
            img = shapes.draw(shapes.CELL, shapes.CELL, [shapes.at(dict(shape=s, color="red", size=z), 0, 0)])
            out[s, z] = int((np.asarray(img) != shapes.BACKGROUND).any(-1).sum())
    return out


def objects_in(img, refs):
    """-> {shape: (column, row)} read off the image's cells."""
    a = (np.asarray(img) != shapes.BACKGROUND).any(-1)
    found = {}
    for r in range(img.height // shapes.CELL):
        for c in range(img.width // shapes.CELL):
            n = a[r * shapes.CELL:(r + 1) * shapes.CELL, c * shapes.CELL:(c + 1) * shapes.CELL].sum()
            if n:
                shape, _ = min(refs, key=lambda k: abs(refs[k] - n))
                found[shape] = (c, r)
    return found


def test_reading_a_hand_built_canvas():
    """The reader itself, on a hand-built 4 x 2 canvas: circle at column 0, square at column 3 of row 1."""
    objs = [shapes.at(dict(shape="circle", color="blue", size="small"), 0, 0),
            shapes.at(dict(shape="square", color="red", size="big"), 3, 1)]
    assert objects_in(shapes.draw(4 * shapes.CELL, 2 * shapes.CELL, objs), reference_counts()) == \
        {"circle": (0, 0), "square": (3, 1)}
    q, ans = shapes.pick_qa(*objs, "lr", 0)
    assert (q, ans) == ("Which is further left, the circle or the square?", "circle")


@pytest.mark.parametrize("task", ["left", "higher", "pick_lr", "pick_ud", "yesno_lr", "yesno_ud"])
def test_two_shape_answers_match_the_pixels(task):
    """Every answer agrees with where the two named shapes are drawn; canvases span 2-8 cells on each axis, and the
    tall and wide extremes occur; "left" and "higher" always ask that one direction."""
    refs, sides = reference_counts(), set()
    gen, answers = shapes.POSITION_PROBES[task]
    k = 0 if task in ("left", "pick_lr", "yesno_lr") else 1  # column or row
    for i in range(150):
        (img,), [(q, ans)] = gen(random.Random(i))
        sides.add((img.width // shapes.CELL, img.height // shapes.CELL))
        assert ans in answers
        found = objects_in(img, refs)
        x, y = [w.strip("?,") for w in q.split() if w.strip("?,") in shapes.SHAPES]
        assert set(found) == {x, y} and found[x][k] != found[y][k], (i, q)
        if task in ("left", "higher"):
            assert ("further left" if task == "left" else "higher") in q, q
        if task in ("left", "higher", "pick_lr", "pick_ud"):
            first = min((x, y), key=lambda s: found[s][k])  # further left / higher
            want = first if ("left" in q or "higher" in q) else ({x, y} - {first}).pop()
        else:
            want = (("left", "right") if k == 0 else ("above", "below"))[found[x][k] > found[y][k]]
        assert ans == want, (i, q, ans, found)
    assert {2, 8} <= {w for w, h in sides} | {h for w, h in sides} and any(w >= 4 * h or h >= 4 * w for w, h in sides)


def test_move2_answer_matches_the_pixels():
    refs = reference_counts()
    for i in range(100):
        frames, [(q, ans)] = shapes.POSITION_PROBES["move2"][0](random.Random(i))
        (c0, r0), = objects_in(frames[0], refs).values()
        (c1, r1), = objects_in(frames[1], refs).values()
        want = {(-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}[c1 - c0, r1 - r0]
        assert len(frames) == 2 and shapes.final(ans) == want, (i, ans)


# -----------------------------------------------------------------------------
# The probe command

def test_probe_end_to_end(tmp_path, capsys):
    """python ablate.py in CI size: every setting trains, is scored, and appears in the table, JSON and PNG."""
    out = tmp_path / "probe"
    ablate.main([f"--out_dir={out}", "--steps=2", "--seeds=2", "--eval_every=1", "--eval_samples=3", "--jobs=2",
                 "--batch_size=2"])
    md = (out / "probe.md").read_text().splitlines()
    assert [r.split(" | ")[0] for r in md[2:2 + len(ablate.SETTINGS_PROBE)]] == \
        [f"| {name}" for name, _ in ablate.SETTINGS_PROBE]
    info = json.load(open(out / "probe.json"))
    assert len(info["runs"]) == 2 * len(ablate.SETTINGS_PROBE) and info["tasks"] == ["left", "higher"]
    assert all(set(r["seconds_per_step"]) == {"left", "higher"} for r in info["runs"])  # one model per question
    for r in info["runs"]:
        assert r["steps"] == [0, 1, 2] and all(len(a) == 3 and all(0 <= x <= 1 for x in a) for a in r["acc"].values())
    assert Image.open(out / "probe.png").size[0] == 2 * 560  # one panel per task


def test_probe_switches_reach_the_model(monkeypatch):
    """Each setting's switches build the model that trains (the table would otherwise compare one model)."""
    built = []
    monkeypatch.setattr(ablate, "NEO", lambda cfg: built.append(cfg) or NEO(cfg))
    opts = dict(ablate.PROBE, steps=1, eval_every=1, eval_samples=1, batch_size=1)
    for name, over in ablate.SETTINGS_PROBE:
        ablate.probe_run((name, over, 1, opts, ["pick_lr"]))
    got = [(c.rope, c.mask, c.patch_rope, c.rope_theta_hw) for c in built]
    assert got == [("native", "mixed", True, 1e4), ("1d", "mixed", True, 1e4), ("native", "mixed", False, 1e4),
                   ("1d", "mixed", False, 1e4), ("native", "causal", False, 1e4), ("native", "mixed", False, 1e6)]


def test_steps_to_90_and_table_by_hand(tmp_path):
    """Steps to 90%: the first evaluation at or above it, mean ± sd over the seeds that reached it, misses said."""
    steps = [0, 100, 200, 300]
    runs = {("A", 1): dict(steps=steps, acc={"t": [0.5, 0.95, 1.0, 1.0]}),
            ("A", 2): dict(steps=steps, acc={"t": [0.5, 0.6, 0.9, 0.8]}),
            ("B", 1): dict(steps=steps, acc={"t": [0.5, 0.5, 0.5, 0.5]}),
            ("B", 2): dict(steps=steps, acc={"t": [0.5, 0.5, 0.7, 0.92]})}
    md = ablate.probe_table(["t"], [("A", {}), ("B", {})], [1, 2], runs).splitlines()
    assert md[2] == "| A | 150 ± 71 | 90 ± 14 |"  # 100, 200; final 100, 80
    assert md[3] == "| B | 300 ± 0 (1 of 2 not reached) | 71 ± 30 |"  # final 50, 92


@pytest.mark.parametrize("bad,says", [("--seeds=0", "--seeds must be in [1, 20]"), ("--steps=-3", "--steps must be"),
                                      ("--tasks=pick_lr,nope", "unknown task 'nope'"),
                                      ("--settings=9", "--settings must be"), ("--jobs=two", "--jobs must be"),
                                      ("--max_iters=3", "unknown option")])
def test_probe_bad_options_are_one_line(tmp_path, capsys, bad, says):
    with pytest.raises(SystemExit) as e:
        ablate.main([f"--out_dir={tmp_path}/p", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ablate.py: ") and says in err[0], err
    assert not (tmp_path / "p").exists()
