r"""
Score a model on a benchmark as the authors do with VLMEvalKit: their prompts, pixel budgets and decoding, then
a rule-based scorer (no judge model). Works for our checkpoints and the released NEO / NEO-ov folders alike.

    python shapes.py --tsv=ShapesWorld.tsv                # the toy's held-out questions as a benchmark TSV
    python eval.py --data ShapesWorld.tsv                 # out/final on it (--init_from as sample.py)
    python eval.py --data MMBench_DEV_EN.tsv --init_from /path/NEO1_0-2B-SFT --device cuda --batch_size 8
    python eval.py --data MME.tsv --init_from /path/NEO1_0-2B-SFT --limit 5 --dry_run   # each row's exact prompt

--data: a TSV in VLMEvalKit's layout (the files their benchmarks ship as): `index`, `image` (base64, a list of
them, or the index of a row holding the same image) or `image_path`, `question`, optional `hint`, option columns
`A`, `B`, ..., `answer`, optional `category`; or a JSONL of our conversation records (data.JSONLDataset's format),
the first user turn the question and the next assistant turn the answer.
The benchmark's name is the file's name (MMBench_DEV_EN.tsv -> MMBench_DEV_EN): as in VLMEvalKit it picks the
question type (Y/N, MCQ, VQA) and the per-benchmark prompt suffix and pixel budget.
Writes, under --results (default eval_results/MODEL/): NAME.jsonl (one prediction per row, appended as they come:
a rerun skips the rows done), NAME.tsv (VLMEvalKit's prediction layout: the input rows without images, plus
`prediction`, which their scorer reads), NAME_score.md and NAME_score.json.
"""
import argparse
import ast
import base64
import csv
import io
import json
import os
import re
import string
import sys
import time

import torch
from PIL import Image
from tqdm import tqdm

import data
import sample
import tokenizer
from common import CoreShare, choose_device, compile_works
from quantize import quantize_int8
from sample import K, SampleError

# -----------------------------------------------------------------------------
# 1. Reading a benchmark: rows of strings, '' where a TSV cell is empty (pandas' NaN)


def read_tsv(path):
    csv.field_size_limit(2 ** 31 - 1)  # a base64 image is one cell of megabytes
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "question" not in rows[0] or "index" not in rows[0]:
        raise SampleError(f"{path}: not a benchmark TSV (need tab-separated columns index, question, image or "
                          f"image_path, answer; VLMEvalKit's layout)")
    return [{k: (v or "").strip() if k != "image" else (v or "") for k, v in r.items() if k is not None} for r in rows]


def read_jsonl(path, image_root):
    """Our conversation records -> benchmark rows: image paths, the first user turn, the next assistant turn."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                turns = [(data.ROLES[c["from"]], c["value"]) for c in rec["conversations"]]
                q = next(i for i, (r, _) in enumerate(turns) if r == "user")
                files = rec.get("image", rec.get("images")) or []
            except (ValueError, KeyError, TypeError, StopIteration) as e:
                raise SampleError(f"{path}:{n}: not a conversation record ({data.one_line(e)}); see data.py's "
                                  f"JSONL format") from None
            files = [files] if isinstance(files, str) else files
            rows.append({"index": str(rec.get("id", n)), "question": turns[q][1].replace("<image>", "").strip(),
                         "answer": turns[q + 1][1] if q + 1 < len(turns) else "",
                         "category": str(rec.get("category", "")),
                         "image_path": repr([os.path.join(image_root, p) for p in files])})
    return rows


def as_list(cell):
    """A cell holding one value or a Python list literal of them (VLMEvalKit's multi-image rows) -> list."""
    if cell.startswith("[") and cell.endswith("]"):
        try:
            return [str(x) for x in ast.literal_eval(cell)]
        except (ValueError, SyntaxError):
            pass
    return [cell] if cell else []


def row_images(row, by_index, root, authors):
    """The row's images as RGB PIL images (DataError naming the row if one cannot be read)."""
    out = []
    for k, cell in enumerate(as_list(row.get("image", "")) or as_list(row.get("image_path", ""))):
        name = f"row {row['index']} image {k + 1}"
        if "image" in row and row["image"]:
            if len(cell) <= 64:  # VLMEvalKit stores a repeated image once: the cell names the row that holds it
                ref = as_list(by_index.get(cell, {}).get("image", ""))
                if k >= len(ref) or len(ref[k]) <= 64:
                    raise data.DataError(f"{name}: names row {cell} as its image, which holds none")
                cell = ref[k]
            try:
                src = Image.open(io.BytesIO(base64.b64decode(cell, validate=False)))
            except Exception as e:
                raise data.DataError(f"{name}: not a base64 image ({data.one_line(e)})") from None
        else:
            src = cell if os.path.isabs(cell) else os.path.join(root, cell)
        try:
            out.append(data.open_image(src, authors))
        except data.DataError as e:
            raise data.DataError(f"{name}: {e}") from None
    return out


# -----------------------------------------------------------------------------
# 2. The authors' prompts (VLMEvalKit/vlmeval/vlm/neo/neo_chat.py build_prompt, set_max_num and utils.py
# build_multi_choice_prompt; NEO-ov: VLMEvalKit_ov/vlmeval/vlm/neo/neo_chat.py)

# VLMEvalKit's DATASET_TYPE for the benchmarks NEO reports (the longest name the file's name starts with); any
# other name is a custom dataset, which it treats as MCQ unless the name holds 'openended' (then VQA)
TYPES = {"MME": "Y/N", "HallusionBench": "Y/N", "POPE": "Y/N", "AMBER": "Y/N", "MME-RealWorld": "MCQ",
         "MMBench": "MCQ", "CCBench": "MCQ", "MMStar": "MCQ", "SEEDBench": "MCQ", "AI2D": "MCQ", "ScienceQA": "MCQ",
         "MMMU": "MCQ", "RealWorldQA": "MCQ", "BLINK": "MCQ", "MUIRBench": "MCQ", "MMVP": "MCQ", "CV-Bench": "MCQ",
         "TextVQA": "VQA", "ChartQA": "VQA", "DocVQA": "VQA", "InfoVQA": "VQA", "OCRBench": "VQA", "OCRVQA": "VQA",
         "GQA": "VQA", "MathVista": "VQA", "MathVision": "VQA", "MathVerse": "VQA", "MMVet": "VQA",
         "LLaVABench": "VQA", "DynaMath": "VQA", "LogicVista": "VQA", "WeMath": "VQA"}
SHORT = "\nAnswer the question using a single word or phrase."
NO_SUFFIX = ("MathVista", "MathVision", "VCR", "MTVQA", "MMVet", "MMDU", "CRPE", "MIA-Bench", "MM-Math", "DynaMath",
             "QSpatial", "WeMath", "LogicVista", "MM-IFEval", "ChartMimic")
# NEO-ov's MMMU_DEV_VAL: its own instruction before the question and options, by the row's question_type
MMMU_OV = {"multiple-choice": "Answer the preceding multiple choice question. The last line of your response should "
           "follow this format: 'Answer: \\boxed LETTER' (without quotes), where LETTER is one of the options. If you "
           "are uncertain or the problem is too complex, make a reasoned guess based on the information provided. "
           "Avoid repeating steps indefinitely—provide your best guess even if unsure. Think step by step logically, "
           "considering all relevant information before answering.\n",
           "open": "Your output should be divided into two parts: First, reason about the correct answer. Then write "
           "the answer in the following format where X is only the answer and nothing else: \"ANSWER: X\""}


def bench_type(name):
    keys = [k for k in TYPES if name.startswith(k)]
    return TYPES[max(keys, key=len)] if keys else "VQA" if "openended" in name.lower() else "MCQ"


def options(row):
    return {c: row[c] for c in string.ascii_uppercase if row.get(c)}


def cn_string(s):
    return re.search("[\u4e00-\u9fff]", s) is not None


def question_text(row, name, preset):
    """The text the authors' build_prompt puts after the images. The toy (preset shapes) is asked as it trained:
    the question alone."""
    q = row["question"]
    if preset == "shapes":
        return q
    kind = bench_type(name)
    if kind == "Y/N":
        if "MME" in name:
            return q + " Answer the question using a single word or phrase."
        if "HallusionBench" in name or "AMBER" in name:
            return q + " Please answer yes or no. Answer the question using a single word or phrase."
        return q
    if kind == "MCQ":
        opts = options(row)
        if preset == "neo-ov" and "MMMU_DEV_VAL" in name and row.get("question_type") in MMMU_OV:
            return MMMU_OV[row["question_type"]] + "\n" + q + "".join(f"\n{k}. {v}" for k, v in opts.items())
        text = (row["hint"] + "\n" + q if row.get("hint") else q) + "".join(f"\n{k}. {v}" for k, v in opts.items())
        if opts:
            return text + ("\n请直接回答选项字母。" if cn_string(text) else
                           "\nAnswer with the option's letter from the given choices directly.")
        return text + ("\n请直接回答问题。" if cn_string(text) else "\nAnswer the question directly.")
    if "LLaVABench" in name or "WildVision" in name:
        return q + "\nAnswer this question in detail."
    if "MathVerse" in name:
        return q.replace("please directly answer the question and", "please")
    return q if any(k in name for k in NO_SUFFIX) else q + SHORT


def pixel_budget(name, preset, s):
    """(min_pixels, max_pixels, upscale the first image 2x) for this benchmark: the preset's, with the kits'
    per-benchmark overrides (set_max_num; generate_inner's MMMU upscale)."""
    lo, hi = s["image_pixels"]
    if preset == "neo1" and "OCRBench" in name:
        lo = 256 * 256
    if preset == "neo-ov":
        if "MMMU_DEV_VAL" in name:
            lo, hi = 1003520, 4014080
        if "TextVQA_VAL" in name:
            lo = 2048 * K
        if "OCRBench" in name:
            lo = 512 * 512
    return lo, max(lo, hi), preset != "shapes" and "MMMU" in name


def build_row(row, name, preset, s, enc, imgs):
    """-> the prompt dict (data.build_prompt) of one row: the authors' question text, images first."""
    lo, hi, upscale = pixel_budget(name, preset, s)
    if upscale and imgs:  # load_image_native(upscale=True): the first image twice its size, bilinear
        imgs = [imgs[0].resize((imgs[0].width * 2, imgs[0].height * 2), Image.BILINEAR)] + imgs[1:]
    tensors, q = [data.to_tensor(im, lo, hi) for im in imgs], question_text(row, name, preset)
    if preset == "neo-ov" and len(tensors) > 1:  # its reorganize_prompt keeps the message's order: text, then images
        msgs = ([("system", s["system"])] if s["system"] else []) + [("user", q + "<image>\n" * len(tensors))]
    else:  # reorganize_prompt: one image "<image>\n" first; NEO 1.0 numbers several ("Image-1: <image>\n...")
        msgs = sample.build_messages(q, len(tensors), None, None, preset, s["system"])
    return data.build_prompt(enc, msgs, tensors)


# -----------------------------------------------------------------------------
# 3. Scoring without a judge: VLMEvalKit's rules (utils/matching_util.py can_infer; dataset/utils/yorn.py
# YOrN_Extraction; dataset/utils/vqa_eval.py process_answer; smp/misc.py process_punctuation)


def can_infer_option(answer, choices):
    """The option letter an answer names, if exactly one option letter stands among its last 5 words."""
    for refusal in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer"):
        if refusal in answer:
            return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", answer).split()
    named = [c for c in choices if c in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and ("Z" in words or "" in words):
        return "Z"
    return None


def can_infer_text(answer, choices):
    """The option whose text alone appears in the answer (answers more than twice the options' length: none)."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer, choices):
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def process_punctuation(text):
    out = text
    for p in [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"]:
        if (p + " " in text or " " + p in text) or re.search(r"(\d)(,)(\d)", text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return re.sub(r"(?<!\d)\.(?!\d)", "", out, count=re.UNICODE)  # sic: their call passes re.UNICODE as the count


def yes_no(answer):
    words = process_punctuation(answer.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return "Unknown"


NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalise(answer):
    """VQA answer normalisation: punctuation, articles, number words (their contraction table is left out)."""
    words = process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()).lower().split()
    return " ".join(NUMBERS.get(w, w) for w in words if NUMBERS.get(w, w) not in ("a", "an", "the"))


def score_row(row, pred, kind):
    """-> (1 right / 0 wrong, matched: could the rules read an answer from pred)."""
    opts = options(row)
    if opts:
        got = can_infer(pred, opts)
        return float(got == row["answer"].strip()), got not in (None, "Z")
    if kind == "Y/N":
        got = yes_no(pred)
        return float(got.lower() == row["answer"].strip().lower()), got != "Unknown"
    golds = as_list(row["answer"])
    if len(golds) > 1:  # VQAv2's accuracy over its 10 annotations: min(1, matches among the others / 3), averaged
        g, p = [normalise(x) for x in golds], normalise(pred)
        return sum(min(1, sum(x == p for j, x in enumerate(g) if j != i) / 3) for i in range(len(g))) / len(g), True
    return float(normalise(pred) == normalise(row["answer"])), True


def score(rows, preds, name):
    """rows: the benchmark's; preds: {index: prediction} -> the score table (dict)."""
    kind, by_cat, unmatched, done = bench_type(name), {}, 0, []
    for r in rows:
        if r["index"] not in preds:
            continue
        hit, ok = score_row(r, preds[r["index"]], kind)
        unmatched += not ok
        by_cat.setdefault(r.get("category") or "all", []).append(hit)
        done.append((r, hit))
    mean = lambda v: round(100 * sum(v) / len(v), 2) if v else None
    out = {"benchmark": name, "scored": len(done), "accuracy": mean([h for _, h in done]), "unmatched": unmatched,
           "categories": {c: {"n": len(v), "accuracy": mean(v)} for c, v in sorted(by_cat.items())}}
    if any(k in name.lower() for k in ("mmbench", "ccbench")):  # circular: each question and its option-shifted
        groups = {}  # copies (index + k * 1e6) must all be right, as VLMEvalKit scores MMBench
        for r, h in done:
            groups.setdefault(int(float(r["index"])) % 1_000_000, []).append(h)
        out["circular_accuracy"] = mean([float(all(v)) for v in groups.values()])
    return out


def score_markdown(t):
    lines = [f"# {t['benchmark']}: {t['model']}", "", f"{t['scored']} rows scored, {t['skipped']} skipped (unreadable "
             f"image or prompt), {t['unmatched']} answers the rules could not read (scored wrong)", "",
             "| | rows | accuracy % |", "|---|---|---|", f"| **overall** | {t['scored']} | {t['accuracy']} |"]
    if "circular_accuracy" in t:
        lines.append(f"| circular (all option orders right) | | {t['circular_accuracy']} |")
    lines += [f"| {c} | {v['n']} | {v['accuracy']} |" for c, v in t["categories"].items()]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# 4. Generation: several rows at once, left-padded, greedy through the KV cache


def answer_batch(model, prompts, s, enc, n_ctx, seed, compile=False):
    """prompts: data.build_prompt dicts -> the answers' texts, as the authors' chat() returns them."""
    ids, dev = tokenizer.special_ids(enc), next(model.parameters()).device
    L = max(len(p["input_ids"]) for p in prompts)
    x = torch.tensor([[ids["im_end"]] * (L - len(p["input_ids"])) + p["input_ids"] for p in prompts], device=dev)
    pad = torch.tensor([[True] * (L - len(p["input_ids"])) + [False] * len(p["input_ids"]) for p in prompts],
                       device=dev)
    imgs = [im.to(dev) for p in prompts for im in p["images"]]  # row by row, as the spans come
    n_new = min(s["max_new_tokens"], n_ctx - L)
    out = model.generate(x, imgs, max_new_tokens=n_new, temperature=s["temperature"], top_k=s["top_k"],
                         top_p=s["top_p"], repetition_penalty=s["repetition_penalty"], eos_id=ids["im_end"], seed=seed,
                         vocab_limit=enc.n_vocab, pad_mask=pad if pad.any() else None, compile=compile)
    return ["".join(sample.stripped(sample.text_pieces(row, enc, {ids["im_end"]}))) for row in out.tolist()]


# -----------------------------------------------------------------------------
# 5. Command line


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="benchmark TSV (VLMEvalKit layout) or JSONL of conversation records")
    p.add_argument("--init_from", default=None, help="model folder or ckpt.pt (default: OUT_DIR/final)")
    p.add_argument("--out_dir", default="out", help="train.py's out_dir, where the default model is (default out)")
    p.add_argument("--preset", default="auto", choices=["auto", "neo1", "neo-ov", "shapes"],
                   help="prompts, pixel budgets and decoding, as sample.py (default auto: from the model)")
    p.add_argument("--results", default=None, help="output folder (default eval_results/MODEL)")
    p.add_argument("--batch_size", type=int, default=8, help="rows generated together (default 8)")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows (default 0: all)")
    p.add_argument("--dry_run", action="store_true", help="print each row's exact prompt and exit; reads no weights")
    p.add_argument("--image_root", default=None, help="JSONL image paths are relative to this (default: its folder)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the preset's, capped by the context")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the preset's)")
    p.add_argument("--min_pixels", type=int, default=None, help="per image (default: the preset's)")
    p.add_argument("--max_pixels", type=int, default=None, help="per image (default: the preset's)")
    p.add_argument("--seed", type=int, default=1337, help="for sampling presets (neo-ov)")
    p.add_argument("--compile", default="False", choices=["True", "False"],
                   help="compile the decode step (neo.NEO.decode_step): ~30 s per batch shape on a CPU, then 1.4-2.3x "
                        "faster decoding of the toy (README, 'Efficiency on a CPU'); default False")
    p.add_argument("--device", default="auto", help="auto (default)|cpu|cuda|cuda:N|mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default auto: bfloat16 on a GPU, the checkpoint's on a CPU")
    p.add_argument("--quantize", default="none", help="int8: weight-only int8 Linear layers, as sample.py; none "
                   "(default)")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.limit < 0 or (a.max_new_tokens is not None and a.max_new_tokens < 1) or \
            (a.temperature is not None and not 0 <= a.temperature < float("inf")):
        raise SampleError("--batch_size and --max_new_tokens must be at least 1, --limit 0 or more, --temperature 0 "
                          "(greedy) or more")
    sample.check_quantize(a.quantize)
    for k in ("system", "top_k", "top_p", "repetition_penalty"):  # sample.settings reads these flags too
        setattr(a, k, None)
    return a


def shown(enc, prompt, cfg):
    """The prompt as text, each image span written as <img><IMG_CONTEXT>*N (rows x cols)</img>."""
    grids = iter([(im.shape[1] // cfg.token_px, im.shape[2] // cfg.token_px) for im in prompt["images"]])

    def span(m):  # one run of <IMG_CONTEXT> tokens: its image's grid, in order
        rows, cols = next(grids)
        return f"<IMG_CONTEXT>*{rows * cols} ({rows}x{cols})"
    return re.sub("(?:<IMG_CONTEXT>)+", span, enc.decode(prompt["input_ids"]))


def load_done(path):
    """{index: prediction} from the predictions file; a last line cut short by a kill is dropped."""
    done = {}
    if os.path.isfile(path):
        with open(path, "rb+") as f:  # cut a last line without its newline, so the next line starts clean
            text = f.read()
            f.truncate(text.rfind(b"\n") + 1)
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                    done[str(r["index"])] = r["prediction"]
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def main(argv=None):
    args = get_args(argv)
    if not os.path.isfile(args.data):
        raise SampleError(f"--data {args.data}: no such file; pass a benchmark TSV or a JSONL of records")
    name = os.path.splitext(os.path.basename(args.data))[0]
    root = args.image_root or os.path.dirname(os.path.abspath(args.data))
    rows = read_jsonl(args.data, root) if args.data.endswith((".jsonl", ".json")) else read_tsv(args.data)
    by_index = {r["index"]: r for r in rows}
    rows = rows[:args.limit or None]

    path = args.init_from or os.path.join(args.out_dir, "final")
    if not args.init_from and not os.path.exists(path):
        raise SampleError(f"no model at {path}: run `python train.py` first, or pass --init_from=DIR "
                          f"({sample.MODELS})")
    enc, ours = sample.load_tokenizer(path)
    cfg = sample.load_config(path, enc)
    preset = sample.choose_preset(args.preset, ours, path)
    s = sample.settings(preset, args, cfg)
    authors = preset != "shapes"
    print(sample.describe(preset, s), file=sys.stderr)

    def prompt_of(r):  # -> (prompt, None) or (None, why it was skipped)
        try:
            p = build_row(r, name, preset, s, enc, row_images(r, by_index, root, authors))
        except data.DataError as e:
            return None, str(e)
        if len(p["input_ids"]) >= cfg.max_seq_len:
            return None, f"row {r['index']}: {len(p['input_ids'])} tokens, over the context of {cfg.max_seq_len}"
        return p, None

    if args.dry_run:
        for r in rows:
            p, why = prompt_of(r)
            print(f"### {r['index']}\n{shown(enc, p, cfg) if p else 'skipped: ' + why}")
        return

    model_name = os.path.basename(os.path.normpath(path))
    if ours:  # out/final -> out_final: our stage folders share their names
        model_name = os.path.basename(os.path.dirname(os.path.abspath(path))) + "_" + model_name
    out = args.results or os.path.join("eval_results", model_name)
    os.makedirs(out, exist_ok=True)
    pred_file = os.path.join(out, name + ".jsonl")
    done = load_done(pred_file)
    todo = [r for r in rows if r["index"] not in done]
    device = choose_device(args.device)
    dtype = None if args.dtype == "auto" and device == "cpu" else getattr(
        torch, args.dtype if args.dtype != "auto" else "bfloat16" if "cuda" in device else "float32")
    # on a CPU, threads follow the load (common.CoreShare): beside a busy process two spinning threads are slower
    # than one, by ~10x when decoding the toy in batches; checked before every batch
    cores = CoreShare(torch.get_num_threads()) if device == "cpu" else None
    model = sample.load_model(path, device, dtype, enc)
    if args.quantize == "int8":
        print(quantize_int8(model), file=sys.stderr)
    compile = args.compile == "True" and compile_works(device, "decoding")
    print(f"{path} on {name}: {len(rows)} rows, {len(rows) - len(todo)} done before, {len(todo)} to go; "
          f"{device} {str(next(model.parameters()).dtype)[6:]}, batch {args.batch_size}"
          f"{', decode step compiled' if compile else ''}", file=sys.stderr)

    skipped, t0, n_gen = [], time.perf_counter(), 0
    with open(pred_file, "a", encoding="utf-8") as f, torch.inference_mode():
        bar = tqdm(total=len(todo), desc=name, unit="row")
        for i in range(0, len(todo), args.batch_size):
            if cores:
                cores.settle() if i == 0 else cores.update()
            batch = []
            for r in todo[i:i + args.batch_size]:
                p, why = prompt_of(r)
                if p is None:  # counted and left out, never the end of the run; a rerun tries it again
                    skipped.append(why)
                    tqdm.write(f"skipped {why}", file=sys.stderr)
                else:
                    batch.append((r, p))
            if batch:
                answers = answer_batch(model, [p for _, p in batch], s, enc, cfg.max_seq_len, args.seed, compile)
                for (r, _), a in zip(batch, answers):
                    f.write(json.dumps({"index": r["index"], "prediction": a}, ensure_ascii=False) + "\n")
                    done[r["index"]] = a
                f.flush()
                n_gen += len(batch)
            bar.update(len(todo[i:i + args.batch_size]))
        bar.close()
    secs = time.perf_counter() - t0

    # VLMEvalKit's prediction layout: the input columns but the images, then `prediction`
    cols = [c for c in rows[0] if c != "image"] + ["prediction"]
    with open(os.path.join(out, name + ".tsv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows([[r.get(c, "") for c in cols[:-1]] + [done[r["index"]]] for r in rows if r["index"] in done])
    table = {**score(rows, done, name), "model": path, "preset": preset, "skipped": len(skipped),
             "rows_per_second": round(n_gen / secs, 3) if n_gen else None}
    with open(os.path.join(out, name + "_score.json"), "w") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(out, name + "_score.md"), "w") as f:
        f.write(score_markdown(table))
    print(score_markdown(table), end="")
    print(f"{n_gen} rows in {secs:.1f} s ({n_gen / max(secs, 1e-9):.2f} rows/s); wrote {out}/{name}.tsv and "
          f"{name}_score.md", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except SampleError as e:
        print(f"eval.py: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
