"""
Tests for checkpoint.py: our folders round-trip; the authors' layout and a Qwen3 load strictly. CPU, seconds each.

    python -m pytest -q test_checkpoint.py
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import checkpoint
from conftest import FIXTURE, inference_config, tiny_cfg, write_tokenizer_json
from neo import NEO


def test_inference_config_format(tmp_path, capsys):
    """A folder in the inference kit's config format loads, image ids from its tokenizer, and reproduces the
    authors' logits; when config and tokenizer disagree, one line says so and the tokenizer wins (as their
    chat() does); with neither, a clear error."""
    with open(os.path.join(FIXTURE, "config.json")) as f:
        hf = json.load(f)
    d = tmp_path / "m"
    os.makedirs(d)
    os.symlink(os.path.join(FIXTURE, "model.safetensors"), d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(inference_config(hf)))
    with pytest.raises(ValueError, match="no img_start_token_id"):
        NEO.from_pretrained(str(d))
    write_tokenizer_json(d)  # the fixture's tokenizer: <img> 256, </img> 257, <IMG_CONTEXT> 258
    model = NEO.from_pretrained(str(d)).eval()
    assert (model.cfg.img_start_id, model.cfg.img_end_id, model.cfg.img_context_id) == (256, 257, 258)
    assert model.cfg.downsample == 2 and capsys.readouterr().err == ""
    case = torch.load(os.path.join(FIXTURE, "case.pt"), weights_only=True)
    with torch.no_grad():
        logits, _ = model(case["input_ids"][None], case["images"])
    assert (logits[0] - case["logits"]).abs().max().item() <= 1e-4
    (d / "config.json").write_text(json.dumps({**hf, "img_context_token_id": 299}))
    assert NEO.from_pretrained(str(d)).cfg.img_context_id == 258
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "disagree" in err and "299" in err


def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained -> from_pretrained is exact, untied and tied (no lm_head tensor when tied)."""
    from safetensors.torch import load_file
    for tie, kv in ((False, 2), (True, 4)):
        torch.manual_seed(0)
        model = NEO(tiny_cfg(tie_word_embeddings=tie, n_kv_head=kv))
        d = tmp_path / f"tie{tie}"
        model.save_pretrained(d)
        names = set(load_file(d / "model.safetensors"))
        assert ("language_model.lm_head.weight" in names) == (not tie)
        assert "language_model.model.layers.1.self_attn.q_proj_hw.weight" in names  # global layer index
        back = NEO.from_pretrained(str(d))
        assert back.cfg == model.cfg
        for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
        if tie:
            assert back.lm_head.weight.data_ptr() == back.embed_tokens.weight.data_ptr()


def test_fixture_layout_matches_ours():
    """Our save layout has exactly the authors' tensor names and config fields."""
    from safetensors.torch import load_file
    model = NEO.from_pretrained(FIXTURE)
    ours = set(checkpoint.hf_state_dict(model))
    theirs = set(load_file(os.path.join(FIXTURE, "model.safetensors")))
    assert ours == theirs


def test_strict_loading_errors(tmp_path):
    """A missing tensor, a mis-shaped tensor, a garbage file, a pickle: clear errors, no silent init."""
    from safetensors.torch import load_file, save_file
    model = NEO(tiny_cfg())
    model.save_pretrained(tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    name = "language_model.model.layers.0.self_attn.k_norm_h.weight"
    sd.pop(name)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="k_norm_h"):
        NEO.from_pretrained(str(tmp_path / "m"))
    sd[name] = torch.ones(3)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="shape"):
        NEO.from_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        NEO.from_pretrained(str(tmp_path / "m"))
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(tmp_path / "ckpt.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(ValueError, match="not a nano-NEO checkpoint"):
        NEO.from_pretrained(str(tmp_path / "ckpt.pt"))


def test_bf16_folder_loads_as_bf16_and_tied(tmp_path):
    """A bf16 folder gives bf16 parameters (not a float32 detour), and a tied lm_head is embed_tokens itself."""
    torch.manual_seed(0)
    model = NEO(tiny_cfg()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    back = NEO.from_pretrained(str(tmp_path / "m"))
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    head, emb = back.lm_head.weight, back.embed_tokens.weight
    assert head is emb and head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()


def test_load_casts_to_requested_dtype(tmp_path):
    """dtype=bfloat16 on a float32 folder or ckpt.pt gives exactly the cast weights."""
    from dataclasses import asdict
    torch.manual_seed(0)
    model = NEO(tiny_cfg(tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "m")
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg)}, tmp_path / "ckpt.pt")
    for path in (tmp_path / "m", tmp_path / "ckpt.pt"):
        back = NEO.from_pretrained(str(path), dtype=torch.bfloat16)
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16)), (path, k)


def test_full_checkpoint_runs_no_random_init(tmp_path, monkeypatch):
    """A released NEO folder and our ckpt.pt are built on the meta device: init_weights never runs."""
    from dataclasses import asdict
    model = NEO(tiny_cfg())
    model.save_pretrained(tmp_path / "m")
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg)}, tmp_path / "ckpt.pt")

    def no_init(self, modules=None):
        raise AssertionError("random init while loading a full checkpoint")
    monkeypatch.setattr(NEO, "init_weights", no_init)
    for path in (tmp_path / "m", tmp_path / "ckpt.pt"):
        back = NEO.from_pretrained(str(path))
        assert not any(p.is_meta for p in back.parameters())
        assert back.lm_head.weight is back.embed_tokens.weight


def qwen3_reference(sd, hf, ids):
    """A plain Qwen3 forward written independently of neo.py: causal, 1-D RoPE, q/k norm, GQA."""
    D, nh, nkv, eps = hf["head_dim"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"]

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rot(x, cos, sin):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin
    L = len(ids)
    ang = torch.arange(L).float()[:, None] / hf["rope_theta"] ** (torch.arange(0, D, 2).float() / D)
    cos, sin = torch.cat((ang, ang), -1).cos()[:, None], torch.cat((ang, ang), -1).sin()[:, None]
    x = sd["model.embed_tokens.weight"][ids]
    causal = torch.ones(L, L).tril().bool()
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rms((h @ sd[p + "self_attn.q_proj.weight"].T).view(L, nh, D), sd[p + "self_attn.q_norm.weight"])
        k = rms((h @ sd[p + "self_attn.k_proj.weight"].T).view(L, nkv, D), sd[p + "self_attn.k_norm.weight"])
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(L, nkv, D)
        q, k = rot(q, cos, sin), rot(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(L, nh * D) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).T


def write_qwen3(path, tie):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    hf = dict(model_type="qwen3", vocab_size=264, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=1e6,
              tie_word_embeddings=tie)
    sd = {"model.embed_tokens.weight": torch.randn(264, 64) * 0.5, "model.norm.weight": 1 + 0.1 * torch.randn(64)}
    if not tie:
        sd["lm_head.weight"] = torch.randn(264, 64) * 0.2
    for i in range(2):
        p = f"model.layers.{i}."
        for n, shp in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)), ("self_attn.v_proj", (32, 64)),
                       ("self_attn.o_proj", (64, 64)), ("mlp.gate_proj", (96, 64)), ("mlp.up_proj", (96, 64)),
                       ("mlp.down_proj", (64, 96))):
            sd[p + n + ".weight"] = torch.randn(shp) * 0.2
        for n, dim in (("self_attn.q_norm", 16), ("self_attn.k_norm", 16), ("input_layernorm", 64),
                       ("post_attention_layernorm", 64)):
            sd[p + n + ".weight"] = 1 + 0.1 * torch.randn(dim)
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return hf, sd


def test_qwen3_init(tmp_path):
    """A Qwen3 folder becomes the Post-LLM: its layer i lands at layer n_pre + i, the H/W projections follow
    init_hw_from_t's rule, and with n_pre_layers=0 the text logits equal the Qwen3 model's."""
    for tie in (True, False):
        hf, sd = write_qwen3(tmp_path / f"q{tie}", tie)
        model = NEO.from_pretrained(str(tmp_path / f"q{tie}"), n_pre_layers=3)
        hsd = checkpoint.hf_state_dict(model)
        assert torch.equal(hsd["language_model.model.layers.4.mlp.up_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"])
        D = 16
        keep = list(range(0, D // 4)) + list(range(D // 2, 3 * D // 4))  # highest-frequency rotary pairs
        for i in (0, 1):
            a = model.post_llm[i].self_attn
            q = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
            for h in range(4):
                rows = q[[h * D + j for j in keep]]
                assert torch.equal(a.q_proj_hw.weight[h * D:(h + 1) * D], torch.cat((rows, rows)))
            assert a.k_proj_hw.weight.abs().sum() == 0 and torch.equal(a.q_norm_w.weight, torch.ones(8))
        model0 = NEO.from_pretrained(str(tmp_path / f"q{tie}"), n_pre_layers=0).eval()
        ids = torch.tensor([5, 17, 99, 3, 250, 8, 8, 41])
        with torch.no_grad():
            ours, _ = model0(ids[None])
        assert (ours[0] - qwen3_reference(sd, hf, ids)).abs().max().item() < 1e-4


def test_qwen3_new_parts_follow_init_rule(tmp_path, monkeypatch):
    """A bf16 Qwen3 folder: the LLM keeps bf16, the new parts (and only they) get init_weights' rule, in bf16;
    dtype=float32 (train.py) gives float32 throughout."""
    from safetensors.torch import save_file
    _, sd = write_qwen3(tmp_path / "q", tie=True)
    save_file({k: v.bfloat16() for k, v in sd.items()}, tmp_path / "q" / "model.safetensors")
    seen, init = [], NEO.init_weights
    monkeypatch.setattr(NEO, "init_weights", lambda self, modules=None: seen.extend(modules) or init(self, modules))
    model = NEO.from_pretrained(str(tmp_path / "q"), n_pre_layers=2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.post_llm[0].self_attn.q_proj not in seen and model.embed_tokens not in seen
    assert model.vision.patch_embedding in seen and model.post_llm[1].self_attn.k_proj_hw in seen
    assert torch.equal(model.post_llm[1].mlp.up_proj.weight, sd["model.layers.1.mlp.up_proj.weight"].bfloat16())
    pre = model.pre_buffer[0]
    assert torch.equal(pre.input_layernorm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert model.vision.dense_embedding.bias.abs().sum() == 0
    assert abs(pre.mlp.up_proj.weight.float().std().item() - 0.02) < 0.003
    assert model.lm_head.weight is model.embed_tokens.weight
    f32 = NEO.from_pretrained(str(tmp_path / "q"), dtype=torch.float32, n_pre_layers=2)
    assert {p.dtype for p in f32.parameters()} == {torch.float32}
