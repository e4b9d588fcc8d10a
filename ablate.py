"""
The paper's Table 3 at toy scale: does each of NEO's design choices change what the toy learns, beyond the
run-to-run spread? Every setting is trained with the same budget and seeds, and scored on ShapesWorld's families
plus the probe families (shapes.PROBE_FAMILIES), which ask about position on canvases of 2-8 token cells a side.

    python ablate.py                           # 6 settings x 3 seeds (75 min on a 2-core AMD EPYC, shared)
    python ablate.py --seeds=2 --max_iters=2 --eval_samples=2 --compile=False   # a smoke test (1.8 min)
    python ablate.py --jobs=1                  # one run at a time (default: one per core, 1 thread each)

Per seed, the toy llm stage runs once (text only: the same for every setting). Then per setting, pretrain ->
midtrain -> sft from it with train.py, at --iters_scale of the default's steps, the probe families mixed into
midtrain and sft at --probe_weight each. Writes out/ablation/ablation.md and ablation.json: mean ± sd over seeds
per family, the blind row (NEO's models with every image replaced by noise) and chance. Any other --key=value
goes to every train.py run.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import shapes
import train

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
    try:
        opts, rest = parse(sys.argv[1:] if argv is None else argv)
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
