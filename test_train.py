"""
Tests for train.py: config parsing, stage freezing, resume, DDP equivalence, a loss that falls. CPU only,
tiny models, a few steps each (the whole file runs in about a minute on 2 cores).

    python -m pytest -q test_train.py
"""
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

import bench
import checkpoint
import common
import evaluate
import shapes
import train
from neo import NEO, set_trainable
from conftest import TINY_MODEL, tiny_cfg  # the tests' model size, one place

HERE = os.path.dirname(os.path.abspath(__file__))
# a tiny model and tiny batches, eager (compiling would take longer than the runs): every run takes seconds
TINY = [f"--{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--batch_size=2", "--max_seq_len=256", "--dtype=float32", "--compile=False", "--threads=1", "--eval_samples=0",
    "--log_interval=100"]


def run(args, nproc=1, check=True, timeout=300):
    """train.py in a subprocess (torchrun for nproc > 1); returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    p = subprocess.run(cmd + args, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out_dir):
    with open(os.path.join(out_dir, "history.json")) as f:
        return [h[2] for h in json.load(f)]


@pytest.fixture(scope="module")
def neo_folder(tmp_path_factory):
    """A random tiny NEO saved in the authors' layout: the starting point of single-stage runs."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    path = str(tmp_path_factory.mktemp("init") / "neo")
    checkpoint.save_stage_folder(NEO(cfg), "bytes", path)
    return path


# ---- config


def test_config_types_and_coercion():
    """--key=value values take the default's type: '1e4' is an int, '1' a float LR, 'False' a bool."""
    cfg = train.parse_config(["--max_iters=1e4", "--learning_rate=1", "--resume=False", "--compile=true",
                              "--out_dir=a=b"])
    assert cfg.max_iters == 10000 and isinstance(cfg.max_iters, int)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.resume is False and cfg.compile is True and cfg.out_dir == "a=b"
    assert train.parse_config(["--model=neo-2b"]).max_seq_len == 8192  # full-scale defaults
    assert train.parse_config(["--model=neo-2b", "--max_seq_len=4096"]).max_seq_len == 4096
    for bad in (["--max_iters=1.5"], ["--max_iters=ten"], ["--resume=maybe"], ["--learning_rate=fast"],
                ["--stage=pretrian"], ["--rope=2d"], ["--nope=1"], ["stray"], ["--batch_size=0"]):
        with pytest.raises(train.ConfigError):
            train.parse_config(bad)


def test_bad_keys_exit_2_with_one_line():
    """Unknown and ill-typed keys: exit code 2 and one line on stderr listing the valid keys."""
    for args, words in ((["--lerning_rate=1e-3"], "valid keys"), (["--max_iters=abc"], "integer"),
                        (["--resume=yes please"], "true or false")):
        p = run(args, check=False)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr
    p = run(["--nope=1"], check=False)
    assert "learning_rate" in p.stderr and "max_iters" in p.stderr


def test_config_file(tmp_path):
    """A config .py first, then overrides; an unknown name in the file is rejected."""
    f = tmp_path / "c.py"
    f.write_text("max_iters = 7\nlearning_rate = 1\n")
    cfg = train.parse_config([str(f), "--max_iters=9"])
    assert cfg.max_iters == 9 and cfg.learning_rate == 1.0
    f.write_text("max_iter = 7\n")
    with pytest.raises(train.ConfigError):
        train.parse_config([str(f)])


def test_lr_schedule():
    """Warm-up to the peak, cosine down to peak * min_lr_ratio at the last step."""
    lrs = [train.get_lr(s, 1.0, 0.1, 10, 100) for s in range(100)]
    assert lrs[9] == 1.0 and max(lrs) == 1.0 and abs(train.get_lr(100, 1.0, 0.1, 10, 100) - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


# ---- training


def test_toy_loss_goes_down(tmp_path):
    """40 steps of the llm stage on ShapesWorld text: the loss falls well below where it started."""
    out = str(tmp_path / "o")
    run(TINY + ["--stage=llm", "--max_iters=40", "--learning_rate=3e-3", f"--out_dir={out}"])
    ls = losses(out)
    assert sum(ls[-5:]) / 5 < 0.7 * sum(ls[:3]) / 3, ls
    assert os.path.isfile(os.path.join(out, "llm", "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "loss.png"))


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("stage", ["pretrain", "midtrain", "spatial", "sft"])
def test_stage_changes_exactly_its_parameters(tmp_path, neo_folder, stage):
    """After a few steps of a stage, exactly the parameters set_trainable(stage) unfreezes have changed (the toy's
    patch embedding LR is 0 after pretrain by default; here it is 0.1 in every stage, so that it moves too)."""
    out = str(tmp_path / "o")
    run(TINY + [f"--stage={stage}", "--max_iters=3", "--vision_lr_scale=0.1", f"--init_from={neo_folder}",
                f"--out_dir={out}"])
    before = NEO.from_pretrained(neo_folder)
    after = NEO.from_pretrained(os.path.join(out, stage))
    set_trainable(before, stage)
    want = {k for k, p in before.named_parameters() if p.requires_grad}
    assert changed(dict(before.named_parameters()), dict(after.named_parameters())) == want
    if stage == "pretrain":  # the LLM is frozen: the embedding and the Post-LLM's own weights stay
        assert "embed_tokens.weight" not in want and "post_llm.0.self_attn.q_proj.weight" not in want
        assert "post_llm.0.self_attn.q_proj_hw.weight" in want and "vision.patch_embedding.weight" in want


def test_vision_lr_scale(tmp_path, neo_folder):
    """The patch embedding's LR is the scheduled LR times vision_lr_scale: the toy's default is 0.1 in pretrain
    and 0 after it, so a default midtrain leaves it put while everything else trains; full-scale presets 1."""
    out = str(tmp_path / "o")
    run(TINY + ["--stage=midtrain", "--max_iters=2", f"--init_from={neo_folder}", f"--out_dir={out}"])
    before = dict(NEO.from_pretrained(neo_folder).named_parameters())
    after = dict(NEO.from_pretrained(os.path.join(out, "midtrain")).named_parameters())
    vision = {k for k in before if k.startswith("vision.")}
    assert len(vision) == 4 and changed(before, after) == set(before) - vision
    toy, big = train.parse_config([]), train.parse_config(["--model=neo-2b"])
    assert [train.vision_lr_scale(toy, s) for s in ("pretrain", "midtrain", "spatial", "sft")] == [0.1, 0, 0, 0]
    assert [train.vision_lr_scale(big, s) for s in ("pretrain", "midtrain", "sft")] == [1.0, 1.0, 1.0]
    assert train.vision_lr_scale(train.parse_config(["--vision_lr_scale=0.5"]), "sft") == 0.5

def test_toy_only_stages():
    """llm and spatial are the toy's own steps: at full scale they are refused with a line that says what to do,
    and the paper's stages have the paper's recipe (train.STAGES, `paper`)."""
    big = train.parse_config(["--model=neo-2b"])
    for stage, words in (("llm", "--init_from=/path/Qwen3"), ("spatial", "pretrain, midtrain, sft")):
        with pytest.raises(train.ConfigError, match=words):
            train.stage_recipe(big, stage)
    assert [train.stage_recipe(big, s)[0] for s in ("pretrain", "midtrain", "sft")] == [8e-4, 5e-5, 5e-5]
    p = run(["--model=neo-2b", "--stage=spatial", "--init_from=nowhere"], check=False)
    assert p.returncode == 2 and "toy-only" in p.stderr, p.stderr
    with pytest.raises(train.ConfigError, match="spatial_curriculum"):
        train.parse_config(["--model=neo-2b", "--spatial_curriculum=True"])


def test_scripts_recipe_lr_schedule():
    """--recipe=scripts takes the released scripts' LR, min-LR ratio, warm-up, steps and rows (train.STAGES,
    `scripts`; the 8B scripts where they differ); the paper's stays the default; the toy refuses it."""
    lr = lambda cfg, stage, step: train.get_lr(step, *train.stage_recipe(cfg, stage))
    two, nine = (train.parse_config([f"--model={m}", "--recipe=scripts"]) for m in ("neo-2b", "neo-9b"))
    # pretrain: 8e-4, 1,000 warm-up steps of 200,000, then cosine to 0.1x
    assert lr(two, "pretrain", 0) == pytest.approx(8e-7)        # 8e-4 * 1 / 1000
    assert lr(two, "pretrain", 999) == pytest.approx(8e-4)      # 8e-4 * 1000 / 1000
    assert lr(two, "pretrain", 100500) == pytest.approx(4.4e-4)  # (100500 - 1000) / 199000 = 0.5: 8e-4 * (0.1 + 0.45)
    assert lr(two, "pretrain", 200000) == pytest.approx(8e-5)   # 8e-4 * 0.1 (the paper's: 8e-4 * 0.05)
    # midtrain: 5e-5, warm-up 3% of 50,000 = 1,500 steps, cosine to 0.2x
    assert train.stage_recipe(two, "midtrain") == (5e-5, 0.2, 1500, 50000)
    assert lr(two, "midtrain", 0) == pytest.approx(5e-5 / 1500)
    assert lr(two, "midtrain", 25750) == pytest.approx(3e-5)    # (25750 - 1500) / 48500 = 0.5: 5e-5 * (0.2 + 0.4)
    # sft: 6e-5, warm-up 3% of 4,500 = 135 steps, cosine to 0.1x
    assert lr(two, "sft", 134) == pytest.approx(6e-5) and lr(two, "sft", 4500) == pytest.approx(6e-6)
    # a fraction of the steps actually run: 3% of --max_iters=1000 is 30
    assert train.stage_recipe(train.parse_config(["--model=neo-2b", "--recipe=scripts", "--max_iters=1000"]),
                              "midtrain")[2] == 30
    assert [train.stage_row(two, s) for s in ("pretrain", "midtrain", "sft")] == [16384, 32768, 34816]
    # the 8B scripts: 200 warm-up steps and 18,432-token rows in midtrain and sft
    assert train.stage_recipe(nine, "midtrain")[2] == 200 and train.stage_row(nine, "sft") == 18432
    paper = train.parse_config(["--model=neo-2b"])
    assert train.stage_recipe(paper, "midtrain") == (5e-5, 0.1, 1000, 50000) and train.stage_row(paper, "sft") == 8192
    assert train.stage_row(train.parse_config(["--model=neo-2b", "--recipe=scripts", "--max_seq_len=4096"]),
                           "sft") == 4096
    with pytest.raises(train.ConfigError, match="paper for the toy"):
        train.parse_config(["--recipe=scripts"])


def photos_jsonl(tmp_path):
    """Photos the test makes (256x256, 64x48), and a JSONL with a three-image record and one-image records."""
    from test_data import photo
    for name in ("a", "b", "c"):
        photo(256, 256).save(tmp_path / f"{name}.jpg")
    photo(64, 48).save(tmp_path / "small.png")
    conv = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A gradient."}]
    p = tmp_path / "photos.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in (
        {"images": ["a.jpg", "b.jpg", "c.jpg"], "conversations": conv}, {"image": "a.jpg", "conversations": conv},
        {"image": "small.png", "conversations": conv})))
    return p


def test_pixel_flags_reach_the_loader_and_the_saved_config(tmp_path, neo_folder):
    """--min_pixels/--max_pixels set the stage's budget: the loader's images have it (three images of one record
    share it as the authors' loader shares it), and the stage folder's config.json, which sample.py reads, keeps it;
    without the flags the model's own budget stays."""
    p = photos_jsonl(tmp_path)
    cfg = train.parse_config(TINY + ["--stage=sft", "--min_pixels=16384", "--max_pixels=65536", f"--data={p}",
                                     f"--image_root={tmp_path}", f"--init_from={neo_folder}", "--max_seq_len=512"])
    st = train.setup_stage(cfg, "sft", neo_folder, common.setup_distributed("cpu"), None)
    assert (st.loader.source.min_pixels, st.loader.source.max_pixels) == (16384, 65536)
    sizes = {tuple(im.shape[1:]) for _ in range(3) for im in next(st.batches)["images"]}
    # three images: max(65536 * 2 // 3, 16384) = 43690 px each: 256x256 -> 192x192 (beta = sqrt(65536 / 43690));
    # one: 65536, 256x256 stays; 64x48 = 3072 px is under 16384: beta = sqrt(16384 / 3072) = 2.309,
    # 48 * 2.309 = 110.9 -> 128, 64 * 2.309 = 147.8 -> 160 (rounded up to multiples of 32)
    assert sizes == {(192, 192), (256, 256), (128, 160)}, sizes
    out = tmp_path / "o"
    run(TINY + ["--stage=sft", "--max_iters=1", "--max_seq_len=512", "--min_pixels=16384", "--max_pixels=65536",
                f"--data={p}", f"--image_root={tmp_path}", f"--init_from={neo_folder}", f"--out_dir={out}"])
    vision = json.load(open(out / "sft" / "config.json"))["vision_config"]
    assert (vision["min_pixels"], vision["max_pixels"]) == (16384, 65536)
    import sample  # which sample.py, with no pixel flags, reads back for the folder train.py wrote
    no_flags = types.SimpleNamespace(min_pixels=None, max_pixels=None, **dict.fromkeys(sample.DECODING))
    enc, ours = sample.load_tokenizer(str(out / "sft"))
    name = sample.choose_preset("auto", ours, str(out / "sft"))
    assert sample.settings(name, no_flags, NEO.from_pretrained(out / "sft").cfg)["image_pixels"] == (16384, 65536)
    own = NEO.from_pretrained(neo_folder).cfg  # no flags: the starting folder's own budget (the toy's 4096-65536)
    cfg = train.parse_config(TINY)
    assert train.stage_pixels(cfg, "sft", own) == (own.min_pixels, own.max_pixels) == (64 * 64, 256 * 256)


def test_scripts_recipe_end_to_end(tmp_path, neo_folder):
    """--recipe=scripts at full scale (a tiny NEO standing in for NEO-2B) on a JSONL of photos: midtrain's LR
    follows the scripts' schedule step by step and its folder keeps the scripts' midtrain budget."""
    p = photos_jsonl(tmp_path)
    out = tmp_path / "o"
    log = run(TINY + ["--model=neo-2b", "--recipe=scripts", "--stage=midtrain", "--max_iters=10", "--grad_accum=1",
                      "--log_interval=1", "--max_seq_len=512", f"--data={p}", f"--image_root={tmp_path}",
                      f"--init_from={neo_folder}", f"--out_dir={out}"]).stdout
    lrs = [line.split(" lr ")[1].split()[0] for line in log.splitlines() if line.startswith("[midtrain] step")]
    # warm-up ceil(3% of 10) = 1 step; then 5e-5 * (0.2 + 0.8 * 0.5 * (1 + cos(pi * (s - 1) / 9))) at step s:
    # s = 5: cos(4 pi / 9) = 0.1736 -> 5e-5 * 0.6695 = 3.35e-05; s = 9: cos(8 pi / 9) = -0.9397 -> 5e-5 * 0.2241
    assert (lrs[0], lrs[1], lrs[5], lrs[9]) == ("5.00e-05", "5.00e-05", "3.35e-05", "1.12e-05"), lrs
    vision = json.load(open(out / "midtrain" / "config.json"))["vision_config"]
    assert (vision["min_pixels"], vision["max_pixels"]) == (256 * 256, 4096 * 4096)  # 2B_2MTsi.sh's


def test_spatial_curriculum_runs_its_stage(tmp_path):
    """--spatial_curriculum=True puts the spatial stage between midtrain and sft, and sft starts from it."""
    out = str(tmp_path / "o")
    p = run(TINY + ["--max_iters=1", "--spatial_curriculum=True", f"--out_dir={out}", "--eval_samples=1",
                    "--blind=False"])
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert [s["stage"] for s in ev["stages"]] == ["llm", "pretrain", "midtrain", "spatial", "sft"]
    assert f"from {os.path.join(out, 'spatial')}" in p.stdout, p.stdout[-2000:]


def test_llm_then_pretrain_hand_over(tmp_path):
    """llm saves a Qwen3 folder; pretrain starts from it with a fresh Pre-Buffer and leaves the LLM as it was."""
    out = str(tmp_path / "o")
    run(TINY + ["--stage=llm", "--max_iters=2", f"--out_dir={out}"])
    run(TINY + ["--stage=pretrain", "--max_iters=2", f"--out_dir={out}", "--eval_samples=2"])
    assert json.load(open(os.path.join(out, "llm", "config.json")))["model_type"] == "qwen3"
    llm = NEO.from_pretrained(os.path.join(out, "llm"), n_pre_layers=1)
    pre = NEO.from_pretrained(os.path.join(out, "pretrain"))
    assert pre.cfg.n_pre_layers == 1
    for k in ("embed_tokens.weight", "post_llm.1.mlp.up_proj.weight", "post_llm.0.self_attn.k_proj.weight"):
        assert torch.equal(llm.state_dict()[k], pre.state_dict()[k]), k
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["stage"] == "pretrain" and "accuracy" in ev and "seconds" in ev


def test_resume_is_exact(tmp_path, neo_folder):
    """Killed after step 5 (last checkpoint at step 4), then --resume=True: the same losses and weights as
    an uninterrupted run."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = TINY + ["--stage=midtrain", "--max_iters=8", "--eval_interval=2", f"--init_from={neo_folder}"]
    run(common + [f"--out_dir={a}"])
    run(common + [f"--out_dir={b}", "--kill_at=5"])
    assert torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"] == 4
    run(common + [f"--out_dir={b}", "--resume=True"])
    assert losses(a) == losses(b)
    wa = NEO.from_pretrained(os.path.join(a, "midtrain")).state_dict()
    wb = NEO.from_pretrained(os.path.join(b, "midtrain")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_equal_one(tmp_path, neo_folder, fsdp):
    """torchrun with 2 CPU processes (gloo), DDP or FSDP2, and the same global batch gives the losses of one
    process, and (FSDP: gathered from the shards) the same final weights."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = TINY + ["--stage=midtrain", "--max_iters=3", "--grad_accum=2", f"--init_from={neo_folder}"]
    run(common + [f"--out_dir={one}"])
    run(common + [f"--out_dir={two}", f"--fsdp={fsdp}"], nproc=2)
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 3
    assert all(abs(x - y) < 1e-4 * max(1.0, abs(x)) for x, y in zip(l1, l2)), (l1, l2)
    w1 = NEO.from_pretrained(os.path.join(one, "midtrain")).state_dict()
    w2 = NEO.from_pretrained(os.path.join(two, "midtrain")).state_dict()
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_auto_dtype_is_measured(monkeypatch, capsys):
    """--dtype=auto on a CPU times both dtypes on the real training step and takes the faster, whatever the
    CPU's flags: here each dtype in turn is made slow, a minute per step on the probe's clock, and the choice
    follows; explicit flags and GPUs skip the measurement."""
    real_clock, lag = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + lag[0])

    def slow(ctx):
        def make(*a, **k):
            lag[0] += 60.0  # far longer than a tiny step takes, however busy the machine
            return ctx(*a, **k)
        return make
    cfg = train.TrainConfig(**TINY_MODEL, batch_size=2, max_seq_len=128)
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", slow(real_autocast))
    assert train.resolve_dtype(cfg, "cpu") == "float32"
    monkeypatch.setattr(torch, "autocast", real_autocast)
    monkeypatch.setattr(common, "nullcontext", slow(contextlib.nullcontext))
    assert train.resolve_dtype(cfg, "cpu") == "bfloat16"
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("float32" in l and "bfloat16" in l and "tok/s" in l for l in lines)
    assert lines[0].endswith("-> float32") and lines[1].endswith("-> bfloat16")
    monkeypatch.setattr(bench, "choose_cpu_dtype", lambda cfg: pytest.fail("measured although the dtype was given"))
    assert train.resolve_dtype(train.TrainConfig(dtype="float32"), "cpu") == "float32"
    assert train.resolve_dtype(train.TrainConfig(), "cuda") == "bfloat16"


def test_threads_follow_free_cores(monkeypatch):
    """CoreShare: when other processes keep a core busy, training drops to the cores left free (spinning OpenMP
    threads on a shared core collapse throughput), and goes back up once the CPU is free again."""
    samples = iter([(0.0, 0.0, 0.0),     # (wall s, CPU s of every process, CPU s of this one)
                    (2.0, 4.0, 2.0),     # 2 s: 4 CPU-s in all, 2 ours -> another process used one core
                    (4.0, 6.0, 3.9),     # 2 s: 2 CPU-s in all, 1.9 ours -> the CPU is free again
                    (4.5, 7.0, 4.0)])    # too soon after the last look (< 1 s): nothing changes
    monkeypatch.setattr(common.CoreShare, "sample", staticmethod(lambda: next(samples)))
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    cores = common.CoreShare(2)
    cores.cores = 2
    assert cores.update() == 1 and abs(cores.others - 1.0) < 1e-9
    assert cores.update() == 2
    assert cores.update() is None
    assert set_to == [1, 2]


def test_compiled_layers_match_eager():
    """compile_layers (--compile=True, the default) trains the same function: loss and every gradient of a
    packed batch with images agree with eager execution."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    tcfg = train.TrainConfig(batch_size=2, max_seq_len=128, stage="midtrain", compile=False)
    batch = next(iter(train.make_loader(tcfg, "midtrain", train.tokenizer.get_tokenizer("shapes"), cfg, 0, 1, 0)))
    model = NEO(cfg)
    result = []
    for compiled in (False, True):
        if compiled:
            common.compile_layers(model)
        model.zero_grad()
        _, loss = model(batch["input_ids"], batch["images"], batch["targets"], batch["doc_ids"],
                        batch["loss_weights"])
        loss.backward()
        result.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = result
    assert abs(l0 - l1) < 1e-4 * abs(l0) and len(g0) == len(g1) > 0
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(g0, g1))
    assert model.post_llm[0]._compiled_call_impl is not None  # it really was compiled


def test_compile_falls_back_to_eager(monkeypatch, capsys):
    """Where torch.compile cannot work (no C++ compiler, say), training goes on eagerly after one line."""
    def broken(*a, **k):
        raise RuntimeError("Compiler: cc is not found.\nmore detail")
    monkeypatch.setattr(torch, "compile", broken)
    assert common.compile_works("cpu") is False
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "training eagerly" in out[0] and "cc is not found" in out[0]


def test_bench_runs():
    """--bench=True prints tokens/s and the achieved fraction of the measured peak."""
    p = run(TINY[:-3] + ["--bench=True"])  # (all but the threads, eval and log keys)
    assert "tok/s" in p.stdout and "GFLOP/s" in p.stdout


def test_ablation_runs_each_setting(tmp_path, monkeypatch):
    """ablate.py: the llm stage once per seed, then each setting from it with its switches really applied."""
    import ablate
    settings = [ablate.SETTINGS[0], ablate.SETTINGS[1], ablate.SETTINGS[4]]  # NEO, 1D-RoPE, no Pre-Buffer
    monkeypatch.setattr(ablate, "SETTINGS", settings)
    out = tmp_path / "abl"
    args = [a for a in TINY if not a.startswith(("--eval_samples", "--threads"))]
    ablate.main(["--pipeline=True", f"--out_dir={out}", "--seeds=1", "--jobs=2", "--eval_samples=1", "--max_iters=1",
                 *args])
    for i, (_, over, _) in enumerate(settings):
        cfg = json.load(open(out / f"run{i}_1337" / "final" / "config.json"))
        llm, ours = cfg["llm_config"], cfg["nano_neo"]
        want = {"rope": "native", "mask": "mixed", "rope_theta_hw": 1e4, "n_pre_layers": 1, **over}
        assert (ours["rope"], ours["mask"], llm["rope_theta_hw"], llm["extra_num_layers"]) == \
            (want["rope"], want["mask"], want["rope_theta_hw"], want["n_pre_layers"]), (i, cfg)
    ev = json.load(open(out / "run0_1337" / "eval.json"))
    assert set(shapes.PROBE_FAMILIES) <= set(ev["accuracy"]) and "blind_accuracy" in ev  # probes scored, blind too
    assert not any("(whole)" in k for k in ev["accuracy"])  # one-word answers (--places=False), as the table's runs
    md = open(out / "ablation.md").read().splitlines()
    assert [r.split(" | ")[0] for r in md[2:2 + len(settings) + 2]] == \
        [f"| {s[0]}" for s in settings] + ["| blind (NEO's models, images = noise)", "| chance"]


def test_places_by_default():
    """The default adds captions with places to pretrain and more video_dir to midtrain; --places=False trains
    the stage mixtures as they are; the spatial curriculum's weights come on top."""
    on, off = train.TrainConfig(), train.parse_config(["--places=False"])
    assert train.extra_weights(on, "pretrain")["grounding"] > 0 and train.extra_weights(on, "midtrain")["video_dir"] > 0
    assert all(train.extra_weights(off, s) is None for s in ("pretrain", "midtrain", "sft"))
    assert train.extra_weights(on, "llm") is None and train.extra_weights(on, "sft") is None
    both = train.extra_weights(train.parse_config(["--spatial_curriculum=True"]), "pretrain")
    assert {"grounding", "caption_rows"} <= set(both)


def test_ablation_checks_arguments_first(tmp_path, capsys):
    """A typo in a train.py key or a bad option is one line and exit code 2 before any run starts, not a failed
    run's log."""
    import ablate
    for bad, says in (("--learning_rat=1e-3", "unknown key 'learning_rat'"), ("--seeds=0", "--seeds must be at least 1"),
                      ("--iters_scale=-1", "--iters_scale must be > 0"), ("--jobs=two", "--jobs must be an integer")):
        with pytest.raises(SystemExit) as e:
            ablate.main(["--pipeline=True", f"--out_dir={tmp_path}/abl", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ablate.py: ") and says in err[0], (bad, err)
    assert not (tmp_path / "abl").exists()  # nothing ran


def test_ablation_table_statistics(tmp_path, monkeypatch):
    """The table's cells are mean ± sample sd over seeds, worked out by hand here, and the means per seed."""
    import ablate
    monkeypatch.setattr(ablate, "SETTINGS", [("A", {}, 44.0), ("B", {"rope": "1d"}, None)])
    fams = ["color", "where", "lr_far", "ab_far", "move", "color_big"]
    acc = {(0, 1): [0.5, 0.25, 0.5, 0.5, 0.25, 1.0], (0, 2): [1.0, 0.75, 1.0, 0.5, 0.75, 1.0],
           (1, 1): [0.0] * 6, (1, 2): [0.5] * 6}
    results = {k: {"accuracy": dict(zip(fams, v)), "blind_accuracy": dict(zip(fams, [0.25] * 6))}
               for k, v in acc.items()}
    info = ablate.write_table(str(tmp_path), dict(ablate.OPTIONS), [1, 2], results, 1.0)
    a = info["rows"][0]
    assert a["per_family"]["color"] == pytest.approx((75.0, 35.3553), abs=1e-3)  # 50, 100: sd = 50/sqrt(2)
    assert a["per_family"]["ab_far"] == pytest.approx((50.0, 0.0))
    # position probes (where, lr_far, ab_far, move) per seed: 37.5 and 75 -> 56.25 ± 26.517
    assert a["mean_position"] == pytest.approx((56.25, 26.5165), abs=1e-3)
    # every family per seed: 3/6 = 50 and 5/6 = 83.33 -> 66.67 ± 23.570
    assert a["mean_visual"] == pytest.approx((66.6667, 23.5702), abs=1e-3)
    md = open(tmp_path / "ablation.md").read()
    assert "| A | 75 ± 35 | 50 ± 35 | 75 ± 35 | 50 ± 0 | 50 ± 35 | 100 ± 0 | 66.7 ± 23.6 | 56.2 ± 26.5 | 44.0 |" in md
    assert "| B | 25 ± 35 |" in md and "| chance | 25 | 25 | 50 | 50 | 25 | 25 |" in md


# ---- what a hostile or clumsy user runs into: one line and a non-zero exit, never a lost run


def one_line_error(p, code=1):
    """-> the last stderr line, after checking the run ended in it (exit code `code`, no traceback)."""
    err = p.stderr.strip().splitlines()
    assert p.returncode == code and "Traceback" not in p.stderr and err and err[-1].startswith("train.py: "), \
        p.stdout[-2000:] + p.stderr[-3000:]
    return err[-1]


def test_nan_stop_names_a_checkpoint_that_resumes(tmp_path, neo_folder):
    """--learning_rate=1e3 goes NaN at step 5. With a checkpoint due every step, the one the stop line names
    holds weights whose loss was finite, so --resume=True with a lower LR gets past the NaN (it used to hold the
    update that made it); with one every 7 steps, the line says that none was saved (it used to name a file
    that did not exist)."""
    out, out7 = str(tmp_path / "o"), str(tmp_path / "o7")
    common = TINY + ["--stage=midtrain", "--max_iters=12", f"--init_from={neo_folder}"]
    p = run(common + ["--learning_rate=1e3", "--eval_interval=1", f"--out_dir={out}"], check=False)
    run(common + ["--learning_rate=1e-4", "--eval_interval=1", f"--out_dir={out}", "--resume=True"])
    assert len(losses(out)) == 12
    line = one_line_error(p)
    assert "not finite" in line and f"{os.path.join(out, 'ckpt.pt')} holds midtrain step" in line, line
    line = one_line_error(run(common + ["--learning_rate=1e3", "--eval_interval=7", f"--out_dir={out7}"], check=False))
    ckpt7 = os.path.join(out7, "ckpt.pt")
    assert (f"{ckpt7} holds midtrain step 7" in line and os.path.isfile(ckpt7)) or \
        ("This run saved no checkpoint" in line and not os.path.exists(ckpt7)), line


def test_out_dir_is_locked(tmp_path, neo_folder):
    """A second train.py on an out_dir in use stops with one line naming the pid that holds it (two runs used to
    write the same ckpt.pt.tmp); a lock whose process died is taken over with a note; a run that ends frees it."""
    out = str(tmp_path / "o")
    os.makedirs(out)
    common = TINY + ["--stage=midtrain", "--max_iters=2", f"--init_from={neo_folder}", f"--out_dir={out}"]
    with open(os.path.join(out, "lock"), "w") as f:  # this process plays the run in progress
        f.write(f"{os.getpid()}\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        line = one_line_error(run(common, check=False))
    assert f"in use by another train.py (pid {os.getpid()}" in line, line
    with open(os.path.join(out, "lock"), "w") as f:
        f.write("999999999\n")  # left by a run that died holding it (no process has this pid)
    assert "pid 999999999 ended without releasing it" in run(common).stdout
    assert "ended without releasing" not in run(common).stdout  # the last run freed it on its way out


def test_unusable_jsonl_stops_with_its_reasons(tmp_path, neo_folder):
    """A JSONL whose records all have empty conversations stops at once with one line giving the reason and the
    first offending line (0-token samples always fit a row: it used to hang at step 0); a JSONL with some bad
    records trains, and the stage ends with a count per reason and the offending lines."""
    empty, mixed = tmp_path / "empty.jsonl", tmp_path / "mixed.jsonl"
    empty.write_text('{"conversations": []}\n' * 3)
    good = json.dumps({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]})
    mixed.write_text("\n".join([good, '{"conversations": []}', "{broken", good]) + "\n")
    common = TINY + ["--stage=sft", "--max_iters=2", f"--init_from={neo_folder}"]
    line = one_line_error(run(common + [f"--data={empty}", f"--out_dir={tmp_path / 'a'}"], check=False, timeout=120))
    assert "no usable sample" in line and "nothing to learn" in line and f"{empty}:" in line, line
    out = run(common + [f"--data={mixed}", f"--out_dir={tmp_path / 'b'}"]).stdout
    report = out[out.index("[sft] skipped"):]
    assert "nothing to learn" in report and f"{mixed}:2" in report and "not valid JSON" in report and \
        f"{mixed}:3" in report, out[-2000:]


def test_jsonl_with_video_files_trains(tmp_path, neo_folder):
    """A JSONL whose `video` records name an mp4 and a webm trains a step on their frames; a truncated mp4 in it
    is skipped, and the stage's report counts it with its line and the file's name."""
    from conftest import write_video  # PyAV writes them (the test skips without it)
    write_video(tmp_path / "a.mp4")
    write_video(tmp_path / "b.webm", size=(37, 23))
    (tmp_path / "cut.mp4").write_bytes((tmp_path / "a.mp4").read_bytes()[:300])
    conv = [{"from": "human", "value": "<video>\nWhich way does the square move?"}, {"from": "gpt", "value": "right"}]
    p = tmp_path / "v.jsonl"
    p.write_text("".join(json.dumps({"video": v, "conversations": conv}) + "\n" for v in ("a.mp4", "b.webm",
                                                                                        "cut.mp4")))
    out = run(TINY + ["--stage=sft", "--max_iters=1", "--max_seq_len=512", f"--init_from={neo_folder}",
                      f"--data={p}", f"--image_root={tmp_path}", f"--out_dir={tmp_path / 'o'}"]).stdout
    assert len(losses(tmp_path / "o")) == 1
    report = out[out.index("[sft] skipped"):]
    assert "unusable image or video" in report and f"{p}:3: {tmp_path / 'cut.mp4'}: not a video, or truncated" \
        in report, out[-2000:]


def test_resume_uses_the_runs_own_config(tmp_path, neo_folder):
    """--resume=True alone continues with the run's own flags, not the defaults (it used to go on to step 1440 at
    batch 8); a flag that would change the run is refused with one line naming it; a safe one is taken."""
    out = str(tmp_path / "o")
    run(TINY + ["--stage=midtrain", "--max_iters=6", "--batch_size=1", "--eval_interval=2", "--kill_at=3",
                f"--init_from={neo_folder}", f"--out_dir={out}"])
    line = one_line_error(run([f"--out_dir={out}", "--resume=True", "--batch_size=8"], check=False, timeout=90), 2)
    assert "--batch_size=8 differs from the run being resumed (batch_size=1)" in line, line
    run([f"--out_dir={out}", "--resume=True", "--eval_interval=1"], timeout=120)
    cfg = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["train_config"]
    assert len(losses(out)) == 6 and (cfg["batch_size"], cfg["max_iters"], cfg["eval_interval"]) == (1, 6, 1)


def test_expected_errors_are_one_line(tmp_path):
    """What the user can fix ends in one line and a non-zero exit, no traceback: values out of range (checked
    before anything runs), a missing --data file, a ckpt.pt of another stage or truncated, a full disk."""
    for bad in (["--learning_rate=-1"], ["--threads=-1"], ["--grad_clip=0"], ["--beta2=1"], ["--seed=-1"],
                ["--min_lr_ratio=2"], ["--learning_rate=nan"], ["--max_iters=-5"], ["--eval_batch=0"],
                ["--n_head=3"], ["--device=gpu"], ["--data=nowhere.jsonl"], ["--data="], ["--init_from=nowhere"],
                ["--min_pixels=1000"], ["--max_pixels=20000000"], ["--min_pixels=8192", "--max_pixels=4096"],
                ["--recipe=script", "--model=neo-2b"], ["--recipe=scripts"], ["--max_seq_len=0"]):
        with pytest.raises(train.ConfigError):
            train.parse_config(bad)
    assert "--learning_rate must be >= 0" in one_line_error(run(["--learning_rate=-1"], check=False), 2)
    # a --min_pixels over the model's own max_pixels (the toy's 65536) is found once the model is loaded
    line = one_line_error(run(TINY + ["--stage=llm", "--min_pixels=100000", f"--out_dir={tmp_path / 'px'}"],
                              check=False), 2)
    assert "min_pixels 100000 is over max_pixels 65536" in line, line
    assert "no such file" in one_line_error(run(["--stage=sft", "--data="], check=False), 2)
    out = str(tmp_path / "o")
    common = TINY + ["--max_iters=2", f"--out_dir={out}"]
    run(common + ["--stage=llm"])
    line = one_line_error(run(common + ["--stage=pretrain", "--resume=True"], check=False), 2)
    assert "--stage=pretrain differs from the run being resumed (stage='llm')" in line, line
    ck = os.path.join(out, "ckpt.pt")
    with open(ck, "r+b") as f:
        f.truncate(os.path.getsize(ck) // 2)
    assert "cannot be read" in one_line_error(run(common + ["--stage=llm", "--resume=True"], check=False))
    if os.path.exists("/dev/full"):  # a full disk: every write to it fails with ENOSPC
        full = tmp_path / "full"
        os.makedirs(full)
        os.symlink("/dev/full", full / "ckpt.pt.tmp")
        line = one_line_error(run(common[:-1] + ["--stage=llm", f"--out_dir={full}"], check=False))
        assert "cannot write" in line and not os.path.lexists(full / "ckpt.pt.tmp"), line


def test_evaluation_never_meets_an_undecodable_id():
    """The toy tokenizer's ids are padded to the model's 576: even a model that prefers the padding ids is scored
    (generation never emits them), where the end-of-stage evaluation used to die with a KeyError in decode."""
    enc = train.tokenizer.get_tokenizer("shapes")
    sp = train.tokenizer.special_ids(enc)
    model = NEO(tiny_cfg(img_start_id=sp["img_start"], img_end_id=sp["img_end"], img_context_id=sp["img_context"]))
    forward = model.forward

    def padding_wins(*a, **k):
        logits, loss = forward(*a, **k)
        return logits.index_fill(-1, torch.arange(enc.n_vocab, model.cfg.vocab_size), 1e4), loss
    model.forward = padding_wins
    acc = evaluate.evaluate(model, enc, train.TrainConfig(eval_samples=2), "cpu", contextlib.nullcontext(),
                            families=["text", "color"])
    assert set(acc) == {"text", "color"}


def test_divergence_is_reported(tmp_path):
    """A run blown up by its LR without a NaN (the loss ends far above where it started) ends with a warning."""
    p = run(TINY + ["--stage=llm", "--max_iters=10", "--learning_rate=100", f"--out_dir={tmp_path / 'o'}"])
    assert "diverged" in p.stderr, p.stderr[-2000:]
    assert common.diverged([6, 6, 5, 30, 26808]) and not common.diverged([6, 5, 4, 3, 2.5] * 2)
    assert not common.diverged([6, 7])  # too short to tell
