"""
Held-out exact match on ShapesWorld, per task family: what train.py prints after each stage and ablate.py compares.
The prompts are ones training never draws (shapes.ShapesWorld(split="val")); shapes.score scores the answers.
"""
import json
import os
import sys
import time
import traceback

import torch
from tqdm import tqdm

import shapes
from common import print0
from tokenizer import special_ids


def evaluate_stage(cfg, stage, model, enc, device, ctx, run, blind):
    """After a stage, held-out exact match on what it taught (llm: the text family, pretrain: captions and text,
    later stages every family, the probe families too where they trained; blind: also with noise for images),
    printed and added to out_dir/eval.json. A failure costs the accuracy, not the run: its traceback, one line, {}."""
    families = {"llm": ["text"], "pretrain": ["caption", "text"]}.get(stage)
    if families is None and cfg.probe_weight > 0:
        families = list(shapes.FAMILIES) + list(shapes.PROBE_FAMILIES)

    def score(noise):
        try:
            return evaluate(model, enc, cfg, device, ctx, blind=noise, families=families)
        except Exception:
            traceback.print_exc()
            print0("evaluation failed (traceback above, please report it); the stage's weights are saved, the run "
                   "goes on", file=sys.stderr)
            return {}
    t0 = time.perf_counter()
    if run.cores:
        run.cores.update()
    entry = {"stage": stage, "accuracy": score(False), "seconds": round(time.perf_counter() - run.t0, 1),
             "eval_seconds": round(time.perf_counter() - t0, 1)}
    if blind:
        entry["blind_accuracy"] = score(True)
    run.evals.append(entry)
    for key, what in (("accuracy", "held-out exact match: "), ("blind_accuracy", "blind (images = noise):  ")):
        if key in entry:
            print0(f"[{stage}] {what}" + ", ".join(f"{k} {v:.0%}" for k, v in entry[key].items()))
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({**entry, "stages": run.evals}, f, indent=2)


@torch.no_grad()
def evaluate(model, enc, cfg, device, ctx, blind=False, families=None):
    """Held-out exact match per task family: greedy generation with the KV cache, prompts of equal token
    length generated together. blind=True replaces every image with noise: the accuracy a model that
    cannot see gets (it should sit at each family's chance level)."""
    model.eval()
    ids = special_ids(enc)
    special = set(ids.values())
    prompts = shapes.ShapesWorld(split="val", enc=enc, min_pixels=model.cfg.min_pixels, max_pixels=model.cfg.max_pixels,
                                 places=cfg.places).eval_prompts(cfg.eval_samples, families=families)
    gen = torch.Generator().manual_seed(0)
    groups = {}
    for p in prompts:  # group by length: a batch of equal-length prompts needs no padding or mask change
        groups.setdefault(len(p["input_ids"]), []).append(p)
    preds = []
    bar = tqdm(total=len(prompts), desc="eval" + (" (blind)" if blind else ""), leave=False,
               disable=int(os.environ.get("RANK", 0)) != 0)
    for L, group in groups.items():
        for i in range(0, len(group), cfg.eval_batch):
            chunk = group[i:i + cfg.eval_batch]
            x = torch.tensor([p["input_ids"] for p in chunk], device=device)
            imgs = [(torch.randn(im.shape, generator=gen) if blind else im).to(device)  # blind: noise, same shapes
                    for p in chunk for im in p["images"]]
            n_new = max(len(enc.encode(p["answer"])) for p in chunk) + 2
            with ctx, torch.compiler.set_stance("force_eager"):  # --compile=True: decode eagerly
                out = model.generate(x, imgs, max_new_tokens=n_new, eos_id=ids["im_end"], vocab_limit=enc.n_vocab)
            for p, row in zip(chunk, out.tolist()):
                row = row[:row.index(ids["im_end"])] if ids["im_end"] in row else row
                preds.append((p, enc.decode([t for t in row if t not in special and t < enc.n_vocab])))
            bar.update(len(chunk))
    bar.close()
    model.train()
    return shapes.score(preds)
