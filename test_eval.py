"""
Tests for eval.py: the authors' prompts (written out by hand from their build_prompt and build_multi_choice_prompt),
the rule-based scorer on hand-written answers, batched = one at a time, resuming, bad rows and the toy's TSV.

    python -m pytest -q test_eval.py
"""
import base64
import csv
import io
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import eval as ev
import shapes
import tokenizer
from conftest import inference_config, tiny_cfg, write_tokenizer_json
from neo import NEO

HERE = os.path.dirname(os.path.abspath(__file__))
RELEASED = os.path.join(HERE, "assets", "neo_official_tiny")


def b64(size, color=(200, 40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows([[r.get(c, "") for c in cols] for r in rows])
    return str(path)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A released-format folder without weights (for --dry_run) and a tiny random model of ours."""
    d = tmp_path_factory.mktemp("eval")
    with open(os.path.join(RELEASED, "config.json")) as f:
        hf = json.load(f)
    hf["llm_config"]["max_position_embeddings"] = 40960  # Qwen3's context: NEO 1.0's 1,300-token images fit
    os.makedirs(d / "neo1")
    (d / "neo1" / "config.json").write_text(json.dumps(inference_config(hf, "neo1_0")))
    write_tokenizer_json(d / "neo1")
    torch.manual_seed(0)
    model = NEO(tiny_cfg())
    for p in model.parameters():  # sharper logits, so greedy answers are not decided by rounding
        p.data.mul_(5.0) if p.dim() > 1 else None
    model.save_pretrained(d / "ours")
    (d / "ours" / "tokenizer.txt").write_text("shapes\n")
    return d


MCQ = {"index": "7", "question": "What is shown?", "hint": "A farm.", "A": "cat", "B": "dog", "C": "bird",
       "answer": "B"}


def test_question_text_as_the_authors_build_it():
    """neo_chat.build_prompt and utils.build_multi_choice_prompt, written out by hand per benchmark name."""
    q = {"question": "Is it red?", "answer": "Yes"}
    assert ev.question_text(q, "MME", "neo1") == "Is it red? Answer the question using a single word or phrase."
    assert ev.question_text(q, "HallusionBench", "neo1") == \
        "Is it red? Please answer yes or no. Answer the question using a single word or phrase."
    assert ev.question_text(q, "POPE", "neo1") == "Is it red?"
    assert ev.question_text(MCQ, "MMBench_DEV_EN", "neo1") == \
        "A farm.\nWhat is shown?\nA. cat\nB. dog\nC. bird\nAnswer with the option's letter from the given choices " \
        "directly."
    assert ev.question_text(MCQ, "MMBench_DEV_CN", "neo1").endswith("C. bird\nAnswer with the option's letter from "
                                                                     "the given choices directly.")
    assert ev.question_text({"question": "狗在哪里?", "A": "左", "B": "右"}, "MMBench_DEV_CN", "neo1") == \
        "狗在哪里?\nA. 左\nB. 右\n请直接回答选项字母。"
    v = {"question": "What is written?", "answer": "stop"}
    assert ev.question_text(v, "TextVQA_VAL", "neo1") == \
        "What is written?\nAnswer the question using a single word or phrase."
    assert ev.question_text(v, "MathVista_MINI", "neo1") == "What is written?"
    assert ev.question_text(v, "LLaVABench", "neo1") == "What is written?\nAnswer this question in detail."
    # a custom name: VLMEvalKit treats it as MCQ, so a row without options is asked to answer directly
    assert ev.question_text(v, "my_photos", "neo1") == "What is written?\nAnswer the question directly."
    assert ev.question_text(v, "my_photos_openended", "neo1") == \
        "What is written?\nAnswer the question using a single word or phrase."
    assert ev.question_text(MCQ, "MMBench_DEV_EN", "shapes") == "What is shown?"  # the toy: as it trained


def test_dry_run_prints_the_authors_prompt_and_pixel_rules(w, tmp_path, capsys):
    """Whole prompts for NEO 1.0, from a folder without weights: one image after the template's user turn, two
    images numbered; OCRBench's minimum of 256x256 px (a 64x64 image: 8x8 tokens, not NEO 1.0's 36x36) and
    MMMU's first image upscaled 2x (1280 px square: 40x40 tokens, upscaled 2560 px is over 4096 tokens, so
    smart_resize gives 64x64)."""
    small, big = b64((64, 64)), b64((1280, 1280))
    rows = [{"index": "1", "image": small, "question": "Q?", "A": "x", "B": "y", "answer": "A"},
            {"index": "2", "image": repr([small, small]), "question": "Which?", "A": "x", "B": "y", "answer": "B"},
            {"index": "3", "image": "1", "question": "Again?", "A": "x", "B": "y", "answer": "A"}]  # row 1's image
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    choose = "\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    tok = "<img><IMG_CONTEXT>*{n} ({r}x{r})</img>"
    ev.main(["--data", write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows), "--init_from", str(w / "neo1"), "--dry_run"])
    one = tok.format(n=1296, r=36)  # 64x64 up to NEO 1.0's 1280 tokens: 36x36 (smart_resize, ceil)
    assert capsys.readouterr().out == (
        "### 1\n" + chat.format(one + "\nQ?" + choose) + "\n"
        "### 2\n" + chat.format(f"Image-1: {one}\nImage-2: {one}\nWhich?" + choose) + "\n"
        "### 3\n" + chat.format(one + "\nAgain?" + choose) + "\n")
    # NEO-ov (VLMEvalKit_ov reorganize_prompt): its system turn, and several images after the text, unnumbered
    ev.main(["--data", str(tmp_path / "MMBench_DEV_EN.tsv"), "--init_from", str(w / "neo1"), "--dry_run",
             "--preset=neo-ov", "--limit=2"])
    system = "<|im_start|>system\nReason step by step.<|im_end|>\n"
    assert capsys.readouterr().out == (
        "### 1\n" + system + chat.format(one + "\nQ?" + choose) + "\n"
        "### 2\n" + system + chat.format("Which?" + choose + f"{one}\n{one}\n") + "\n")
    ocr = [{"index": "1", "image": small, "question": "Text?", "answer": "a"}]
    ev.main(["--data", write_tsv(tmp_path / "OCRBench.tsv", ocr), "--init_from", str(w / "neo1"), "--dry_run"])
    assert capsys.readouterr().out == "### 1\n" + chat.format(tok.format(n=64, r=8) + "\nText?\nAnswer the question "
                                                                               "using a single word or phrase.") + "\n"
    for name, r in (("MMMU_DEV_VAL", 64), ("AI2D_TEST", 40)):
        mmmu = [{"index": "1", "image": big, "question": "Q?", "A": "x", "B": "y", "answer": "A"}]
        ev.main(["--data", write_tsv(tmp_path / f"{name}.tsv", mmmu), "--init_from", str(w / "neo1"), "--dry_run"])
        assert capsys.readouterr().out == "### 1\n" + chat.format(tok.format(n=r * r, r=r) + "\nQ?" + choose) + "\n"


def test_scorer_on_hand_written_answers():
    """VLMEvalKit's rules, worked by hand. Options A cat, B dog, C bird; the answer B."""
    cases = {"B": (1, True), "The answer is B.": (1, True), "dog": (1, True), "B. dog, or maybe C": (1, True),
             "A cat": (0, True),                        # one letter named: A
             "I think it is a dog or a cat": (0, False),  # no capital letter; 29 chars > 2 x 10: no text match
             "B, and B is also like C, and the rest": (0, False),  # two letters named, the text too long
             "Cannot determine the answer": (0, False)}  # a refusal: Z
    for pred, want in cases.items():
        assert ev.score_row(MCQ, pred, "MCQ") == want, pred
    yn = {"index": "1", "question": "Red?", "answer": "Yes"}
    for pred, want in {"Yes": (1, True), "yes, it is.": (1, True), "No.": (0, True), "Yes and no": (0, False),
                       "There is a dog": (0, False)}.items():
        assert ev.score_row(yn, pred, "Y/N") == want, pred
    assert ev.score_row({"answer": "two"}, "2", "VQA") == (1, True)            # number words
    assert ev.score_row({"answer": "the red car"}, "Red car.", "VQA") == (1, True)  # articles, case, full stop
    assert ev.score_row({"answer": "3"}, "three apples", "VQA") == (0, True)
    # VQAv2's ten answers, 3 x "2" and 7 x "3", predicted "2": a "2" annotator leaves 2 matches (2/3), a "3" one
    # leaves 3 (1): (3 x 2/3 + 7 x 1) / 10 = 0.9
    assert ev.score_row({"answer": repr(["2"] * 3 + ["3"] * 7)}, "2", "VQA")[0] == pytest.approx(0.9)


def test_score_table_with_categories_and_circular_mmbench():
    """Four rows, two questions each with an option-shifted copy (index + 1e6): 3 of 4 right (75%), but only
    question 1 right in both orders (circular 50%); per category: a 2/2, b 1/2."""
    rows = [{"index": i, "question": "Q", "A": "x", "B": "y", "answer": a, "category": c}
            for i, a, c in (("1", "A", "a"), ("1000001", "B", "a"), ("2", "A", "b"), ("1000002", "B", "b"))]
    t = ev.score(rows, {"1": "A", "1000001": "B", "2": "A", "1000002": "I cannot say"}, "MMBench_DEV_EN")
    assert (t["accuracy"], t["circular_accuracy"], t["unmatched"], t["scored"]) == (75.0, 50.0, 1, 4)
    assert t["categories"] == {"a": {"n": 2, "accuracy": 100.0}, "b": {"n": 2, "accuracy": 50.0}}


def test_toy_tsv_gives_the_prompts_training_evaluates(tmp_path):
    """shapes.py --tsv rows, read back by eval.py with the toy's preset, are token for token and pixel for pixel
    the held-out prompts train.py's evaluation scores (ShapesWorld(split='val').prompt)."""
    path = tmp_path / "ShapesWorld.tsv"
    shapes.export_tsv(str(path), n=2)
    rows, enc, cfg = ev.read_tsv(str(path)), tokenizer.get_tokenizer("shapes"), tiny_cfg()
    s = {"image_pixels": (cfg.min_pixels, cfg.max_pixels), "system": ""}
    world = shapes.ShapesWorld("sft", "val", min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    assert len(rows) == 2 * len(shapes.TSV_FAMILIES)
    for r in rows:
        fam, i = r["category"], int(r["index"]) % 10_000
        want = world.prompt(world.example(i, fam))
        got = ev.build_row(r, "ShapesWorld", "shapes", s, enc, ev.row_images(r, {}, "", False))
        assert got["input_ids"] == want["input_ids"] and r["answer"] == want["answer"], (fam, i)
        assert all(torch.equal(a, b) for a, b in zip(got["images"], want["images"]))


def run_eval(w, tmp_path, *extra):
    ev.main(["--data", str(tmp_path / "ShapesWorld.tsv"), "--init_from", str(w / "ours"), "--max_new_tokens=6",
             "--device=cpu", *extra])
    with open(tmp_path / "res" / "ShapesWorld.jsonl") as f:
        return [json.loads(line) for line in f]


def test_batched_equals_one_at_a_time_and_a_killed_run_resumes(w, tmp_path, monkeypatch, capsys):
    """Ten rows of different lengths (1 and 2 images) in batches of 4 give the answers of batches of 1; a run
    killed after its first batch of 4 resumes with the other 6, repeating none."""
    shapes.export_tsv(str(tmp_path / "ShapesWorld.tsv"), n=1)
    one = run_eval(w, tmp_path, "--batch_size=1", f"--results={tmp_path / 'res'}")
    assert len(one) == 10 and len({p["prediction"] for p in one}) > 1  # answers differ between rows
    os.remove(tmp_path / "res" / "ShapesWorld.jsonl")
    calls, answer = [], ev.answer_batch

    def killed_at_second(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return answer(*a, **k)
    monkeypatch.setattr(ev, "answer_batch", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        run_eval(w, tmp_path, "--batch_size=4", f"--results={tmp_path / 'res'}")
    monkeypatch.setattr(ev, "answer_batch", answer)
    with open(tmp_path / "res" / "ShapesWorld.jsonl", "a") as f:
        f.write('{"index": "50000", "predic')  # a line cut short by the kill
    capsys.readouterr()
    four = run_eval(w, tmp_path, "--batch_size=4", f"--results={tmp_path / 'res'}")
    assert "4 done before, 6 to go" in capsys.readouterr().err
    assert four == one  # the same answers, each row once, in order (batches of 4 rows are row order)
    with open(tmp_path / "res" / "ShapesWorld.tsv") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert [r["prediction"] for r in table] == [p["prediction"] for p in one] and "image" not in table[0]


def test_quantize_int8(w, tmp_path, capsys):
    """--quantize=int8: one line says what became int8, and every row is answered."""
    shapes.export_tsv(str(tmp_path / "ShapesWorld.tsv"), n=1)
    got = run_eval(w, tmp_path, "--batch_size=4", "--quantize=int8", "--limit=5", f"--results={tmp_path / 'res'}")
    assert "int8: 28 Linear layers (lm_head included)" in capsys.readouterr().err
    assert len(got) == 5 and all(isinstance(p["prediction"], str) for p in got)


def test_broken_image_row_is_skipped_and_counted(w, tmp_path, capsys):
    rows = [{"index": "1", "image": b64((64, 64)), "question": "How many shapes are there?", "answer": "1"},
            {"index": "2", "image": b64((64, 64))[:48], "question": "How many shapes are there?", "answer": "1"},
            {"index": "3", "image": "99", "question": "How many shapes are there?", "answer": "1"}]
    ev.main(["--data", write_tsv(tmp_path / "mine.tsv", rows), "--init_from", str(w / "ours"), "--max_new_tokens=4",
             f"--results={tmp_path / 'res'}"])
    err = capsys.readouterr().err
    assert "skipped row 2 image 1:" in err and "skipped row 3 image 1: names row 99" in err
    with open(tmp_path / "res" / "mine_score.json") as f:
        t = json.load(f)
    assert (t["scored"], t["skipped"]) == (1, 2)


def test_jsonl_records_as_benchmark_rows(w, tmp_path, capsys):
    """Our conversation records: the image path relative to the file's folder, the first user turn the question
    (its <image> placeholder dropped: the preset puts the images), the next assistant turn the answer."""
    os.makedirs(tmp_path / "img")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "img" / "a.png")
    recs = [{"id": "r1", "image": "img/a.png", "category": "color", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rows = ev.read_jsonl(str(tmp_path / "mine.jsonl"), str(tmp_path))
    assert [(r["index"], r["question"], r["answer"], r["category"]) for r in rows] == \
        [("r1", "What color is the square?", "red", "color")]
    ev.main(["--data", str(tmp_path / "mine.jsonl"), "--init_from", str(w / "ours"), "--dry_run"])
    assert capsys.readouterr().out == "### r1\n<|im_start|>user\n<img><IMG_CONTEXT>*4 (2x2)</img>What color is the " \
                                      "square?<|im_end|>\n<|im_start|>assistant\n\n"


@pytest.mark.parametrize("args,says", [
    (["--data", "nope.tsv"], "no such file"),
    (["--data", "{bad}", "--batch_size=0"], "--batch_size"),
    (["--data", "{bad}"], "not a benchmark TSV"),
    (["--data", "{bad}", "--quantize=fp8"], "--quantize=fp8: choose int8")])
def test_bad_inputs_are_one_line(w, tmp_path, args, says):
    import subprocess
    import sys
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    args = [a.replace("{bad}", str(tmp_path / "bad.tsv")) for a in args]
    p = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), *args, "--init_from", str(w / "ours")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 1 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
