"""
The paper's position claims (Table 3) at toy scale, in a form a student can run and watch: small NEOs (~1M
parameters) trained from scratch, one per setting, seed and position question, on canvases of 2-8 x 2-8 token
cells, scored on held-out prompts every 50 steps; 3 seeds per setting, learning curves with the seeds' spread.

    python ablate.py                     # 6 settings x 3 seeds x 2 questions x 400 steps: out/ablation/probe.*
    python ablate.py --tasks=yesno_lr --settings=0 --seeds=1 --steps=1000   # the hard form (EXPERIMENTS.md)
    python ablate.py --tasks=left,higher --together=True   # one model on both: ~4x the steps
    python ablate.py --steps=2 --seeds=1 --eval_samples=4 --eval_every=1    # a smoke test (seconds)
    python ablate.py --pipeline=True     # the older ablation: every setting through the whole toy pipeline (75 min)

The probe (default): "Which is further left, the circle or the square?" -> a shape (`left`), and "Which is higher,
...?" (`higher`); shapes.POSITION_PROBES has the others. Accuracy is the share of held-out prompts whose answer
token is the model's most likely next token. Settings: the NEO row, then one switch at a time (SETTINGS_PROBE says
why). Measured (EXPERIMENTS.md, "The position probe"): 31 min on a 2-core AMD EPYC shared with other work (~24
quiet); only 1D-RoPE without the patch rotation stays at chance on `left` in every seed.

--pipeline=True: per seed, the toy llm stage runs once (text only: the same for every setting). Then per setting,
pretrain -> midtrain -> sft from it with train.py, at --iters_scale of the default's steps, the probe families
mixed into midtrain and sft at --probe_weight each. Writes out/ablation/ablation.md and ablation.json: mean ± sd
over seeds per family, the blind row (NEO's models with every image replaced by noise) and chance. Any other
--key=value goes to every train.py run.
"""
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
from PIL import Image, ImageDraw

import data
import shapes
import train
from neo import NEO, NEOConfig

# -----------------------------------------------------------------------------
# The position probe (the default)

# (setting, NEOConfig switches). NEO first; then 1D-RoPE with and without the patch embedding's 2-D rotation (the
# rotation gives every token its absolute (row, column) whatever the LLM's RoPE, so a RoPE switch alone shows
# little); then, with the rotation off, where position comes from the attention alone, the mask and the H/W base.
SETTINGS_PROBE = [
    ("NEO: Native-RoPE, rotation on, mixed mask, H/W base 1e4", {}),
    ("1D-RoPE", {"rope": "1d"}),
    ("rotation off", {"patch_rope": False}),
    ("1D-RoPE, rotation off", {"rope": "1d", "patch_rope": False}),
    ("causal mask, rotation off", {"mask": "causal", "patch_rope": False}),
    ("H/W base 1e6, rotation off", {"rope_theta_hw": 1e6, "patch_rope": False}),
]
# ~1.0M parameters: NEO's layout (Pre-Buffer 2 + Post-LLM 2), d_model 128
PROBE_MODEL = dict(d_model=128, n_layer=2, n_pre_layers=2, n_head=4, n_kv_head=2, head_dim=32, d_mlp=384,
                   vision_dim=64, min_pixels=shapes.CELL ** 2)  # min_pixels: a 1 x 2-cell canvas stays 2 tokens
PROBE = dict(out_dir="out/ablation", tasks="left,higher", together=False, settings="all", seeds=3, steps=400,
             eval_every=50, eval_samples=200, jobs=os.cpu_count() or 1, batch_size=16, lr=2e-3, pipeline=False)
BOUNDS = dict(seeds=(1, 20), steps=(1, 100_000), eval_every=(1, 100_000), eval_samples=(1, 10_000), jobs=(1, 64),
              batch_size=(1, 1024), lr=(1e-6, 1.0))


def parse_probe(argv):
    """--key=value over PROBE -> (opts, tasks, settings); a bad value raises train.ConfigError (one line)."""
    opts = dict(PROBE)
    for a in argv:
        k, eq, v = a.removeprefix("--").partition("=")
        if not (a.startswith("--") and eq and k in PROBE):
            raise train.ConfigError(f"unknown option {a!r}; the probe's options: " + ", ".join(f"--{k}" for k in PROBE))
        opts[k] = train.coerce(k, v, PROBE[k])
    for k, (lo, hi) in BOUNDS.items():
        if not lo <= opts[k] <= hi:
            raise train.ConfigError(f"--{k} must be in [{lo}, {hi}], got {opts[k]}")
    tasks = opts["tasks"].split(",")
    if bad := [t for t in tasks if t not in shapes.POSITION_PROBES]:
        raise train.ConfigError(f"unknown task {bad[0]!r}; choose from {', '.join(shapes.POSITION_PROBES)}")
    try:
        idx = range(len(SETTINGS_PROBE)) if opts["settings"] == "all" else [int(i) for i in opts["settings"].split(",")]
        settings = [SETTINGS_PROBE[i] for i in idx]
    except (ValueError, IndexError):
        raise train.ConfigError(f"--settings must be 'all' or indices 0-{len(SETTINGS_PROBE) - 1}, comma-separated, "
                                f"got {opts['settings']!r}") from None
    return opts, tasks, settings


def held_out(tasks, n):
    """n prompts per task from ShapesWorld's held-out split, each with its answer's token id."""
    world = shapes.ShapesWorld(split="val", places=False, min_pixels=PROBE_MODEL["min_pixels"])
    out = {t: [world.prompt(world.example(i, t)) for i in range(n)] for t in tasks}
    for p in (p for ps in out.values() for p in ps):
        (p["answer_id"],) = world.enc.encode(p["answer"])  # every probe answer is one token
    return out


@torch.no_grad()
def accuracy(model, prompts, pad_id, batch=64):
    """Share of prompts whose answer token is the model's most likely next token (one forward pass)."""
    model.eval()
    hits = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        n = [len(p["input_ids"]) for p in chunk]
        x = torch.full((len(chunk), max(n)), pad_id)  # padding after the prompt: no prompt token can see it
        for b, p in enumerate(chunk):
            x[b, :n[b]] = torch.tensor(p["input_ids"])
        logits, _ = model(x, [im for p in chunk for im in p["images"]])  # (B, L, vocab)
        last = logits[torch.arange(len(chunk)), torch.tensor(n) - 1]      # (B, vocab) after "assistant\n"
        hits += (last.argmax(-1) == torch.tensor([p["answer_id"] for p in chunk])).sum().item()
    model.train()
    return hits / len(prompts)


def probe_run(job):
    """One (setting, seed): a model from scratch, trained on the tasks mixed evenly, the batch's loss on the answer
    token only. -> {"steps", "acc" {task: [...]}, "loss" [mean training loss since the last evaluation]}."""
    name, over, seed, opts, tasks = job
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = NEO(NEOConfig(**PROBE_MODEL, **over))
    opt = train.configure_optimizers(model, 0.01, opts["lr"], (0.9, 0.95))
    world = shapes.ShapesWorld(seed=seed, places=False, min_pixels=PROBE_MODEL["min_pixels"])
    pad_id = data.special_ids(world.enc)["eot"]
    evals = held_out(tasks, opts["eval_samples"])
    curve, losses, t0 = {"steps": [], "acc": {t: [] for t in tasks}, "loss": []}, [], time.perf_counter()
    for step in range(opts["steps"] + 1):
        if step % opts["eval_every"] == 0 or step == opts["steps"]:
            curve["steps"].append(step)
            curve["loss"].append(statistics.mean(losses) if losses else None)
            for t in tasks:
                curve["acc"][t].append(accuracy(model, evals[t], pad_id))
            losses = []
        if step == opts["steps"]:
            break
        for g in opt.param_groups:
            g["lr"] = train.get_lr(step, opts["lr"], 0.1, 50, opts["steps"]) * g["lr_scale"]
        i0 = step * opts["batch_size"]
        samples = [world.encode(world.example(i, tasks[i % len(tasks)])) for i in range(i0, i0 + opts["batch_size"])]
        b = data.collate([[s] for s in samples], max(len(s["input_ids"]) for s in samples), pad_id)
        _, loss = model(b["input_ids"], b["images"], b["targets"], b["doc_ids"], b["loss_weights"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    curve["seconds_per_step"] = (time.perf_counter() - t0) / max(1, opts["steps"])
    print(f"  {name}, seed {seed}: " + ", ".join(f"{t} {100 * a[-1]:.0f}%" for t, a in curve["acc"].items()) +
          f" ({curve['seconds_per_step']:.2f} s/step)", flush=True)
    return curve


def steps_to(curve_steps, accs, level=0.9):
    return next((s for s, a in zip(curve_steps, accs) if a >= level), None)


def mean_sd_str(xs, fmt="{:.0f}"):
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return (fmt + " ± " + fmt).format(statistics.mean(xs), sd)


def probe_table(tasks, settings, seeds, runs):
    """-> markdown: per setting and task, steps to 90% (mean ± sd over the seeds that reached it) and final %."""
    head = ["setting", *[f"{t}: steps to 90%" for t in tasks], *[f"{t}: final %" for t in tasks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, _ in settings:
        cells = []
        for t in tasks:
            reached = [steps_to(runs[name, s]["steps"], runs[name, s]["acc"][t]) for s in seeds]
            ok = [r for r in reached if r is not None]
            miss = len(reached) - len(ok)
            cells.append(mean_sd_str(ok) + (f" ({miss} of {len(seeds)} not reached)" if miss else ""))
        cells += [mean_sd_str([100 * runs[name, s]["acc"][t][-1] for s in seeds]) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLOURS = [(200, 40, 40), (40, 90, 200), (230, 140, 0), (120, 60, 170), (30, 150, 70), (110, 110, 110)]


def draw_curves(tasks, settings, seeds, runs, path):
    """One panel per task: held-out accuracy vs step, per setting its seeds' mean (line) and min-max (band)."""
    pw, H, m = 560, 440, 50
    im = Image.new("RGB", (pw * len(tasks), H + 20 * len(settings) + 20), "white")
    d = ImageDraw.Draw(im, "RGBA")
    steps = runs[settings[0][0], seeds[0]]["steps"]
    for k, t in enumerate(tasks):
        x0 = k * pw
        X = lambda s: x0 + m + s / max(1, steps[-1]) * (pw - 2 * m)
        Y = lambda a: H - m - a * (H - 2 * m)
        d.rectangle((x0 + m, m, x0 + pw - m, H - m), outline="black")
        for a in (0, 0.5, 0.9, 1.0):
            d.line((x0 + m, Y(a), x0 + pw - m, Y(a)), fill=(225, 225, 225) if a != 0.9 else (170, 170, 170))
            d.text((x0 + 12, Y(a) - 6), f"{100 * a:.0f}%", fill="black")
        d.text((x0 + m, 15), f"{t}: held-out accuracy ({len(seeds)} seeds: mean, min-max)", fill="black")
        d.text((x0 + pw // 2 - 15, H - m + 12), f"step (0-{steps[-1]})", fill="black")
        for (name, _), c in zip(settings, COLOURS):
            per_step = list(zip(*[runs[name, s]["acc"][t] for s in seeds]))  # (n_points, n_seeds)
            lo = [(X(s), Y(min(v))) for s, v in zip(steps, per_step)]
            hi = [(X(s), Y(max(v))) for s, v in zip(steps, per_step)]
            if len(steps) > 1:
                d.polygon(lo + hi[::-1], fill=(*c, 45))
                d.line([(X(s), Y(statistics.mean(v))) for s, v in zip(steps, per_step)], fill=c, width=2)
    for j, ((name, _), c) in enumerate(zip(settings, COLOURS)):
        d.line((m, H + 10 + 20 * j, m + 30, H + 10 + 20 * j), fill=c, width=3)
        d.text((m + 40, H + 4 + 20 * j), name, fill="black")
    im.save(path)


def probe_main(argv):
    opts, tasks, settings = parse_probe(argv)
    root, t0 = opts["out_dir"], time.perf_counter()
    os.makedirs(root, exist_ok=True)
    seeds = [1337 + k for k in range(opts["seeds"])]
    # one model per task: a ~1M model asked two questions must also read which one, and needs ~4x the steps
    # (EXPERIMENTS.md, section 'The position probe'); --together=True trains one on all of them
    groups = [tasks] if opts["together"] else [[t] for t in tasks]
    jobs = [(name, over, s, opts, g) for g in groups for s in seeds for name, over in settings]
    print(f"ablate: the position probe, tasks {', '.join(tasks)}: {len(jobs)} models ({len(settings)} settings x "
          f"{len(seeds)} seeds x {len(groups)} task groups) of {opts['steps']} steps, {min(opts['jobs'], len(jobs))} at "
          f"a time on 1 thread each")
    with ProcessPoolExecutor(min(opts["jobs"], len(jobs)), mp_context=get_context("spawn")) as pool:
        curves = list(pool.map(probe_run, jobs))
    runs = {}  # (setting, seed) -> its curves, every task's
    for (name, _, s, _, g), c in zip(jobs, curves):
        r = runs.setdefault((name, s), dict(steps=c["steps"], acc={}, loss={}, seconds_per_step={}))
        r["acc"].update(c["acc"])
        r["loss"]["+".join(g)], r["seconds_per_step"]["+".join(g)] = c["loss"], c["seconds_per_step"]
    minutes = (time.perf_counter() - t0) / 60
    n_params = sum(p.numel() for p in NEO(NEOConfig(**PROBE_MODEL)).parameters())
    md = probe_table(tasks, settings, seeds, runs) + (
        f"\n\nHeld-out accuracy (%), mean ± sd over seeds {', '.join(map(str, seeds))}; steps to 90%: the first "
        f"evaluation (every {opts['eval_every']} steps) at or above 90%, over the seeds that reached it; "
        f"{opts['eval_samples']} held-out prompts per task and point; {n_params / 1e6:.2f}M parameters, "
        f"{opts['steps']} steps of {opts['batch_size']} prompts, LR {opts['lr']}, "
        f"{'one model on all tasks' if opts['together'] else 'one model per task'}; {minutes:.1f} min.\n")
    info = dict(command="python ablate.py " + " ".join(argv), options=opts, tasks=tasks, seeds=seeds,
                minutes=round(minutes, 1), n_params=n_params,
                runs=[dict(setting=name, switches=over, seed=s, **runs[name, s]) for name, over in settings
                      for s in seeds])
    with open(os.path.join(root, "probe.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(root, "probe.md"), "w") as f:
        f.write(md)
    draw_curves(tasks, settings, seeds, runs, os.path.join(root, "probe.png"))
    print("\n" + md + f"({root}/probe.md, probe.json, probe.png)")
    return info


# -----------------------------------------------------------------------------
# The pipeline ablation (--pipeline=True)

# (setting, train.py switches, the paper's Table 3 average over its benchmarks; None where it has no such row)
SETTINGS = [
    ("NEO: Native-RoPE, mixed mask, H/W base 1e4, Pre-Buffer 2", {}, 44.0),
    ("1D-RoPE", {"rope": "1d"}, 39.8),
    ("causal mask", {"mask": "causal"}, 40.3),
    ("H/W base 1e6", {"rope_theta_hw": 1e6}, 42.0),
    ("Pre-Buffer 0 layers", {"n_pre_layers": 0}, None),
    ("Pre-Buffer 4 layers", {"n_pre_layers": 4}, None),
]
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
OPTIONS = dict(out_dir="out/ablation", seeds=3, jobs=os.cpu_count() or 1, iters_scale=0.25, probe_weight=0.5,
               eval_samples=200)


def parse(argv):
    """--key=value: OPTIONS here; the rest go to every train.py run, and train.py's own parser checks them all
    now (a typo is one line at once, not a failed run's log an hour later)."""
    opts, rest = dict(OPTIONS), []
    for a in argv:
        k, eq, v = a.removeprefix("--").partition("=")
        if a.startswith("--") and eq and k in OPTIONS:
            opts[k] = train.coerce(k, v, OPTIONS[k])
        else:
            rest.append(a)
    for k in ("seeds", "jobs", "eval_samples"):
        if opts[k] < 1:
            raise train.ConfigError(f"--{k} must be at least 1, got {opts[k]}")
    train.parse_config([*rest, *(f"--{k}={opts[k]}" for k in ("iters_scale", "probe_weight", "eval_samples"))])
    return opts, rest


def run_all(jobs, n_parallel):
    """jobs: [(name, folder, train.py args)] -> runs them, n_parallel at a time on 1 thread each."""
    todo, running = list(jobs), []
    while todo or running:
        while todo and len(running) < n_parallel:
            name, folder, args = todo.pop(0)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "log.txt"), "w") as log:  # the child keeps its own copy
                p = subprocess.Popen([sys.executable, TRAIN, *args, f"--out_dir={folder}", "--threads=1"],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            running.append((name, folder, p, time.perf_counter()))
        time.sleep(0.5)
        for r in [r for r in running if r[2].poll() is not None]:
            running.remove(r)
            name, folder, p, t0 = r
            if p.returncode != 0:
                for _, _, q, _ in running:
                    q.terminate()
                raise SystemExit(f"ablate.py: {name} failed (exit {p.returncode}); its log: {folder}/log.txt")
            print(f"  {name}: done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pipeline = "--pipeline=True" in argv
    try:
        if not pipeline:
            return probe_main(argv)
        opts, rest = parse([a for a in argv if a != "--pipeline=True"])
    except train.ConfigError as e:  # as train.py: a bad command line is one line and exit code 2
        print(f"ablate.py: {e}", file=sys.stderr)
        sys.exit(2)
    root, t0 = opts["out_dir"], time.perf_counter()
    seeds = [1337 + k for k in range(opts["seeds"])]
    # one-word answers: the probes ask whether positions decide in one pass, not whether the model can write them
    # out first (train.py --places; a later --places=... on the command line wins)
    common = ["--places=False", f"--eval_samples={opts['eval_samples']}", *rest]
    print(f"ablate: {len(SETTINGS)} settings x {len(seeds)} seeds, {opts['jobs']} at a time, logs in {root}/")
    run_all([(f"llm, seed {s}", f"{root}/llm_{s}", ["--stage=llm", f"--seed={s}", "--blind=False", *common])
             for s in seeds], opts["jobs"])
    jobs = []
    for s in seeds:  # seed-major: a run stopped part-way still has whole seeds to compare
        for i, (name, over, _) in enumerate(SETTINGS):
            jobs.append((f"{name}, seed {s}", f"{root}/run{i}_{s}",
                         [f"--init_from={root}/llm_{s}/llm", f"--seed={s}", f"--iters_scale={opts['iters_scale']}",
                          f"--probe_weight={opts['probe_weight']}", "--eval_every_stage=False", f"--blind={i == 0}",
                          *common, *[f"--{k}={v}" for k, v in over.items()]]))  # the setting's switches win
    run_all(jobs, opts["jobs"])
    results = {(i, s): json.load(open(f"{root}/run{i}_{s}/eval.json")) for i in range(len(SETTINGS)) for s in seeds}
    write_table(root, opts, seeds, results, (time.perf_counter() - t0) / 60)


def mean_sd(xs):
    return 100 * statistics.mean(xs), (100 * statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_table(root, opts, seeds, results, minutes):
    scored = results[(0, seeds[0])]["accuracy"]
    fams = [f for f in [*shapes.FAMILIES, *shapes.PROBE_FAMILIES] if f in scored and f != "text"]
    position = [f for f in shapes.PROBE_FAMILIES if f not in shapes.PROBE_CONTROLS]
    rows = [(name, paper, [results[(i, s)]["accuracy"] for s in seeds]) for i, (name, _, paper) in enumerate(SETTINGS)]
    rows.append(("blind (NEO's models, images = noise)", None, [results[(0, s)]["blind_accuracy"] for s in seeds]))
    head = ["setting", *fams, "mean, visual families", "mean, position probes", "paper Table 3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out = []
    for name, paper, accs in rows:
        cells = {f: mean_sd([a[f] for a in accs]) for f in fams}
        visual = mean_sd([statistics.mean(a[f] for f in fams) for a in accs])  # per seed, then over seeds
        probes = mean_sd([statistics.mean(a[f] for f in position) for a in accs])
        out.append(dict(setting=name, paper=paper, per_family=cells, mean_visual=visual, mean_position=probes,
                        per_seed=accs))
        lines.append(f"| {name} | " + " | ".join(f"{m:.0f} ± {sd:.0f}" for m, sd in cells.values()) +
                     f" | {visual[0]:.1f} ± {visual[1]:.1f} | {probes[0]:.1f} ± {probes[1]:.1f} | "
                     f"{'-' if paper is None else paper} |")
    lines.append("| chance | " + " | ".join(f"{100 * shapes.CHANCE[f]:.0f}" for f in fams) + " | | | |")
    md = "\n".join(lines) + (f"\n\nExact match (%), mean ± sd over seeds {', '.join(map(str, seeds))}; "
                             f"{opts['eval_samples']} held-out prompts per family; iters_scale {opts['iters_scale']}, "
                             f"probe_weight {opts['probe_weight']}; {minutes:.0f} min.\n")
    info = dict(command="python ablate.py " + " ".join(sys.argv[1:]), options=opts, seeds=seeds,
                minutes=round(minutes, 1), rows=out)
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(root, "ablation.md"), "w") as f:
        f.write(md)
    print("\n" + md + f"({root}/ablation.md, {root}/ablation.json)")
    return info


if __name__ == "__main__":
    main()
