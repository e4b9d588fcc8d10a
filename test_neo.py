"""
Tests for neo.py, the model. All on CPU, seconds each.

    python -m pytest -q test_neo.py
"""
import os

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import FIXTURE, span, tiny_cfg
from neo import (HW_NAMES, IGNORE_INDEX, NEO, NEOConfig, attention, attention_math, attention_probs,
                 build_attention_mask, build_positions, set_trainable)


# ---- the anchor: the authors' own implementation


def test_parity_with_authors_logits():
    """from_pretrained on the authors' tiny NEO (assets/neo_official_tiny) reproduces their logits (<= 1e-4)."""
    model = NEO.from_pretrained(FIXTURE).eval()
    case = torch.load(os.path.join(FIXTURE, "case.pt"), weights_only=True)
    with torch.no_grad():
        logits, _ = model(case["input_ids"][None], case["images"])
    assert (logits[0] - case["logits"]).abs().max().item() <= 1e-4
    pos, _ = build_positions(case["input_ids"][None], [(2, 3)], model.cfg)
    assert pos[0, 0].tolist() == case["t_index"].tolist()


def test_patch_embed_is_the_papers_two_convolutions():
    """PatchEmbed's matmul path equals Conv -> GELU -> 2-D rotation -> Conv written with F.conv2d, per image, on
    two images of different sizes and aspect ratios."""
    torch.manual_seed(0)
    vision = NEO(tiny_cfg()).vision
    with torch.no_grad():
        for conv in (vision.patch_embedding, vision.dense_embedding):  # outputs of order 1, not 0.02's
            conv.weight.normal_(std=conv.weight[0].numel() ** -0.5)
            conv.bias.normal_()
        imgs = [torch.randn(3, 64, 96), torch.randn(3, 128, 32)]
        fast = vision(imgs)
        ref = torch.cat([vision.forward_reference(img) for img in imgs])
    assert fast.shape == ref.shape == (2 * 3 + 4 * 1, vision.cfg.d_model)
    assert ref.abs().mean() > 0.1 and torch.allclose(fast, ref, atol=1e-5, rtol=0)


# ---- Native-RoPE indices and the mask, written out by hand (neo.py sections 2 and 3)


def test_positions_by_hand():
    """text, a 2x3-token image, text, a 2x2-token image, text: t, h, w as build_positions' docstring states them."""
    cfg = tiny_cfg()
    a = 65
    ids = torch.tensor([[a, a] + span(cfg, 2, 3) + [a] + span(cfg, 2, 2) + [a]])
    pos, img_id = build_positions(ids, [(2, 3), (2, 2)], cfg)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 4, 5, 6, 7, 7, 7, 7, 8, 9]
    assert pos[1, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    assert pos[2, 0].tolist() == [0, 0, 0, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0, 1, 0, 1, 0, 0]
    assert img_id[0].tolist() == [-1, -1, -1, 0, 0, 0, 0, 0, 0, -1, -1, -1, 1, 1, 1, 1, -1, -1]


def test_packed_mask_and_positions_by_hand():
    """A packed row: doc 0 = text, two 1x2 video frames, text; doc 1 = two text tokens; t restarts."""
    cfg = tiny_cfg()
    a = 65
    ids = torch.tensor([[a] + span(cfg, 1, 2) + span(cfg, 1, 2) + [a] + [a, a]])
    doc = torch.tensor([[0] * 10 + [1] * 2])
    pos, img_id = build_positions(ids, [(1, 2), (1, 2)], cfg, doc)
    assert pos[0, 0].tolist() == [0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 0, 1]
    assert pos[2, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]
    expected = ["100000000000",
                "110000000000",
                "111100000000",  # a visual token sees the later token of its own frame
                "111100000000",
                "111110000000",
                "111111000000",
                "111111110000",  # frame 2 sees frame 1 (causal across frames), and itself both ways
                "111111110000",
                "111111111000",
                "111111111100",
                "000000000010",  # doc 1 sees nothing of doc 0
                "000000000011"]
    mask = build_attention_mask(doc, img_id)[0, 0]
    assert ["".join(str(int(v)) for v in row) for row in mask] == expected
    causal = build_attention_mask(doc, img_id, mixed=False)[0, 0]
    assert not causal[2, 3] and causal[3, 2]


def test_rope_1d_ablation_indices():
    """--rope=1d: every token, visual ones too, gets its own t; h = w = 0."""
    cfg = tiny_cfg(rope="1d")
    ids = torch.tensor([[65] + span(cfg, 1, 2) + [65]])
    pos, _ = build_positions(ids, [(1, 2)], cfg)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5] and pos[1:].abs().sum() == 0


def transposed(model):
    """The same model for transposed images: the patch convs transposed, the 2-D rotation's column and row channel
    halves swapped, and every head's H and W channels (q/k_proj_hw rows, their norms) swapped."""
    C, D, sd = model.cfg.vision_dim, model.cfg.head_dim, model.state_dict()
    swap = lambda t, dim, n: torch.cat(t.split(n // 2, dim)[::-1], dim)
    out = {}
    for k, v in sd.items():
        if k.endswith("patch_embedding.weight"):                        # (C, 3, p, p)
            v = swap(v.transpose(2, 3), 0, C)
        elif k.endswith("patch_embedding.bias"):
            v = swap(v, 0, C)
        elif k.endswith("dense_embedding.weight"):                      # (d, C, s, s)
            v = swap(v.transpose(2, 3), 1, C)
        elif k.endswith("_proj_hw.weight"):                             # (heads * D, d): [H | W] per head
            v = swap(v.view(-1, D, v.shape[-1]), 1, D).reshape(v.shape)
        elif "_norm_h." in k:                                            # q_norm_h <-> q_norm_w, k the same
            v = sd[k.replace("_norm_h.", "_norm_w.")]
        elif "_norm_w." in k:
            v = sd[k.replace("_norm_w.", "_norm_h.")]
        out[k] = v
    twin = NEO(model.cfg).eval()
    twin.load_state_dict(out)
    return twin


@pytest.mark.parametrize("rope", ["native", "1d"])
def test_rows_and_columns_are_alike(rope):
    """Native-RoPE has no preferred axis: a transposed image through the transposed model gives the same answer, so
    whatever tells rows from columns in a trained model came from its data. Under 1D-RoPE it does not (raster order)."""
    torch.manual_seed(0)
    model = NEO(tiny_cfg(rope=rope)).eval()
    with torch.no_grad():  # random H/W weights, not the init rule's (k_proj_hw = 0), so every H/W part counts
        for n, p in model.named_parameters():
            if any(f".{h}." in n for h in HW_NAMES):
                p.copy_(torch.randn_like(p) * (0.1 if "proj" in n else 1))
    img = torch.randn(3, 64, 96)                                        # 2 x 3 tokens
    ids = torch.tensor([[65] + span(model.cfg, 2, 3) + [66, 67]])
    with torch.no_grad():
        a, _ = model(ids, [img])
        b, _ = transposed(model)(torch.tensor([[65] + span(model.cfg, 3, 2) + [66, 67]]), [img.transpose(1, 2)])
    gap = (a[0, -3:] - b[0, -3:]).abs().max().item()                   # the text tokens after the image
    assert gap < 1e-4 if rope == "native" else gap > 1e-2


def test_image_token_count_mismatch_is_an_error():
    cfg = tiny_cfg()
    ids = torch.tensor([[65] + span(cfg, 1, 2)])
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        NEO(cfg)(ids, [torch.randn(3, 64, 64)])


# ---- packing, backends, generation


def test_packed_documents_equal_separate_runs():
    """Logits of documents packed in one row equal each document run alone: images of different sizes,
    a text-only document, two images in one document."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = NEO(cfg).eval()
    docs = [([1, 2] + span(cfg, 2, 3) + [3], [torch.randn(3, 64, 96)]),
            ([4, 5, 6, 7], []),
            ([8] + span(cfg, 1, 2) + [9] + span(cfg, 3, 1) + [10], [torch.randn(3, 32, 64), torch.randn(3, 96, 32)])]
    ids = torch.tensor([sum((d for d, _ in docs), [])])
    doc_ids = torch.tensor([sum(([i] * len(d) for i, (d, _) in enumerate(docs)), [])])
    with torch.no_grad():
        packed, _ = model(ids, sum((im for _, im in docs), []), doc_ids=doc_ids)
        start = 0
        for d, im in docs:
            alone, _ = model(torch.tensor([d]), im)
            assert torch.allclose(packed[0, start:start + len(d)], alone[0], atol=1e-5)
            start += len(d)


def test_math_attention_equals_sdpa():
    """The hand-written masked softmax (the CPU path: GQA by stacking query heads, no k/v copies) computes what
    SDPA computes, with a mask and without (decoding), in float32 and bf16."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 32), torch.randn(2, 2, 7, 32), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask |= torch.eye(7, dtype=torch.bool)
    for m in (mask, None):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.25, enable_gqa=True)
        assert torch.allclose(attention(q, k, v, m, 0.25), ref, atol=1e-5)
        assert torch.allclose(attention_math(q, k, v, m, 0.25), ref, atol=1e-5)
        bf = attention_math(q.bfloat16(), k.bfloat16(), v.bfloat16(), m, 0.25)
        assert torch.allclose(ref, bf.float(), atol=5e-2)
    got = attention_probs(q, k, mask, 0.25) @ v.repeat_interleave(2, 1)  # what --show_attention draws
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25,
                                                              enable_gqa=True), atol=1e-5)


def flex_case():
    """A tiny model and a pack of two documents with two images and padding, for the FlexAttention tests."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    ids = torch.tensor([[1, 2] + span(cfg, 2, 2) + [3, 4, 5] + span(cfg, 1, 2) + [6, 0, 0, 0]])
    doc = torch.tensor([[0] * 9 + [1] * 7 + [-1] * 3])
    return NEO(cfg).eval(), ids, doc, [torch.randn(3, 64, 64), torch.randn(3, 32, 64)]


def test_flex_attention_equals_sdpa():
    """FlexAttention with a BlockMask from the same rule gives the SDPA result (compiles on CPU: ~25 s)."""
    model, ids, doc, imgs = flex_case()
    with torch.no_grad():
        ref, _ = model(ids, imgs, doc_ids=doc)
        model.cfg.attn = "flex"
        got, _ = model(ids, imgs, doc_ids=doc)
    assert (ref - got).abs().max().item() < 1e-4


def test_flex_failure_falls_back_to_sdpa_once(monkeypatch, capsys):
    """If the FlexAttention call raises (as its compile does for q/k 256 wide on GPUs with less shared memory than an
    H100), one line says so and every forward from then on runs SDPA with the BlockMask's rule as a dense boolean
    mask: the logits are the dense-mask path's, bit for bit, and Flex is not tried again."""
    import neo
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("No valid triton configs. OutOfResources: out of resource: shared memory\nmore detail")
    monkeypatch.setattr(neo, "_flex_attention", broken)
    monkeypatch.setattr(neo, "_flex_failed", False, raising=False)
    monkeypatch.setattr(neo, "_dense_of", (None, None), raising=False)
    model, ids, doc, imgs = flex_case()
    with torch.no_grad():
        ref, _ = model(ids, imgs, doc_ids=doc)  # the dense mask of build_attention_mask (a CPU's default)
        model.cfg.attn = "flex"
        got = [model(ids, imgs, doc_ids=doc)[0] for _ in range(2)]
    assert calls == [1]  # the first layer of the first forward; never again
    err = capsys.readouterr().err.strip()
    assert err == ("FlexAttention failed (RuntimeError: No valid triton configs. OutOfResources: out of resource: "
                   "shared memory); SDPA with the mixed mask as a dense boolean mask from now on")
    assert all(torch.equal(g, ref) for g in got)


def test_cached_generation_equals_uncached():
    """Greedy decoding through the KV cache gives the tokens of the no-cache reference (image in prompt)."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = NEO(cfg).eval()
    for p in model.parameters():  # sharper logits, so the greedy path is not decided by rounding
        p.data.mul_(5.0) if p.dim() > 1 else None
    ids = torch.tensor([[1, 2] + span(cfg, 2, 3) + [3, 4]])
    img = [torch.randn(3, 64, 96)]
    a = model.generate(ids, img, max_new_tokens=12)
    b = model.generate(ids, img, max_new_tokens=12, use_cache=False)
    assert a.shape == (1, 12) and a.tolist() == b.tolist()
    assert len(set(a[0].tolist())) > 1  # not a degenerate constant stream


def test_compiled_decode_equals_eager():
    """generate(compile=True) runs decode_step through torch.compile on a cache of 32 slots (a power of two; the whole
    buffer read, the mask hiding the empty slots): the same greedy tokens as eager, for a padded batch."""
    torch.manual_seed(0)
    cfg = tiny_cfg(max_seq_len=64)
    model = NEO(cfg).eval()
    for p in model.parameters():  # sharper logits, so the greedy path is not decided by rounding
        p.data.mul_(5.0) if p.dim() > 1 else None
    ids = torch.tensor([[1, 2] + span(cfg, 2, 3) + [3, 4], [0] * 6 + span(cfg, 1, 2) + [5, 6]])
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[1, :6] = True
    imgs = [torch.randn(3, 64, 96), torch.randn(3, 32, 64)]
    eager = model.generate(ids, imgs, max_new_tokens=10, pad_mask=pad)
    assert model.generate(ids, imgs, max_new_tokens=10, pad_mask=pad, compile=True).tolist() == eager.tolist()
    assert len(set(eager[0].tolist())) > 1  # not a degenerate constant stream


class Head(torch.nn.Module):
    """Stands in for a model's lm_head: the tests' own logits, the same in the prompt and every decode step."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def test_padded_batch_generation_equals_one_at_a_time():
    """Three prompts of different lengths (one image, two images, none) left-padded into one batch: each row's
    greedy tokens equal the prompt generated alone. Without pad_mask the padding shifts t and is attended to."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = NEO(cfg).eval()
    for p in model.parameters():  # sharper logits, so the greedy path is not decided by rounding
        p.data.mul_(5.0) if p.dim() > 1 else None
    prompts = [([1, 2] + span(cfg, 2, 3) + [3, 4], [torch.randn(3, 64, 96)]),
               ([5] + span(cfg, 1, 1) + span(cfg, 2, 1) + [6, 7, 8, 9], [torch.randn(3, 32, 32), torch.randn(3, 64, 32)]),
               ([10, 11, 12], [])]
    alone = [model.generate(torch.tensor([ids]), imgs, max_new_tokens=8)[0].tolist() for ids, imgs in prompts]
    L = max(len(ids) for ids, _ in prompts)
    x = torch.tensor([[0] * (L - len(ids)) + ids for ids, _ in prompts])          # left padding with id 0
    pad = torch.tensor([[True] * (L - len(ids)) + [False] * len(ids) for ids, _ in prompts])
    imgs = [im for _, ims in prompts for im in ims]                              # row by row, in prompt order
    assert model.generate(x, imgs, max_new_tokens=8, pad_mask=pad).tolist() == alone
    assert model.generate(x, imgs, max_new_tokens=8).tolist() != alone          # the padding matters


def test_generation_never_emits_vocab_padding():
    """The toy pads its 545-id tokenizer to 576 ids: with vocab_limit, generation never emits a padding id (the
    tokenizer could not decode it), even when those are the likeliest, greedy or sampled at any temperature."""
    torch.manual_seed(0)
    model = NEO(tiny_cfg()).eval()
    head = model.lm_head
    model.lm_head = Head(lambda x: head(x).index_fill(-1, torch.arange(545, 576), 1e4))  # padding far likelier
    ids = torch.tensor([[1, 2, 3]])
    assert (model.generate(ids, max_new_tokens=4) >= 545).all()  # the case being guarded against
    for t in (0.0, 1.0, 1e-45):
        out = model.generate(ids, max_new_tokens=6, temperature=t, seed=0, vocab_limit=545)
        assert out.shape == (1, 6) and (out < 545).all(), (t, out)


def test_top_p_and_repetition_penalty_by_hand():
    """Hugging Face semantics, worked by hand. Repetition penalty 2 on ids 0 and 2 of logits [2, 1.5, -1, 0.5]:
    [1, 1.5, -2, 0.5], so greedy picks id 1, not 0. top_p on probabilities [0.5, 0.3, 0.15, 0.05]: 0.7 keeps
    {0.5, 0.3} (0.5 alone < 0.7), i.e. id 0 with 0.5 / 0.8 = 0.625; 0.4 keeps id 0 alone; a tiny top_p still one."""
    from neo import sample_next
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5]])
    assert sample_next(logits).item() == 0
    assert sample_next(logits, repetition_penalty=2.0, prev_ids=torch.tensor([[0, 2, 2]])).item() == 1
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    ids = sample_next(p, 1.0, top_p=0.7, generator=gen)
    assert set(ids.tolist()) == {0, 1} and abs((ids == 0).float().mean().item() - 0.625) < 0.03
    assert (sample_next(p, 1.0, top_p=0.4, generator=gen) == 0).all()
    assert (sample_next(p, 1.0, top_p=1e-9, generator=gen) == 0).all()
    assert set(sample_next(p, 1.0, top_p=1.0, generator=gen).tolist()) == {0, 1, 2, 3}


def test_generate_penalises_prompt_and_answer_ids():
    """The repetition penalty counts the prompt's ids and each new one. Logits fixed at 3 for id 7 and 2 for id
    8, penalty 2, prompt [1, 7, 3]: 7 -> 1.5 so 8 comes first; then 8 -> 1, and 7 (1.5) wins from then on."""
    torch.manual_seed(0)
    model = NEO(tiny_cfg()).eval()

    def fixed(x):  # the head's logits, at every position and step
        out = x.new_zeros(*x.shape[:-1], model.cfg.vocab_size)
        out[..., 7], out[..., 8] = 3.0, 2.0
        return out
    model.lm_head = Head(fixed)
    ids = torch.tensor([[1, 7, 3]])
    assert model.generate(ids, max_new_tokens=4).tolist() == [[7, 7, 7, 7]]
    assert model.generate(ids, max_new_tokens=4, repetition_penalty=2.0).tolist() == [[8, 7, 7, 7]]
    assert model.generate(ids, max_new_tokens=4, repetition_penalty=2.0, use_cache=False).tolist() == [[8, 7, 7, 7]]


# ---- training behaviour


def test_pretrain_stage_changes_exactly_the_listed_parameters():
    """After one AdamW step in `pretrain`, exactly the patch embedding, the Pre-Buffer and every layer's
    q_proj_hw / k_proj_hw / H-W norms changed; embed_tokens, lm_head, final norm and the LLM did not."""
    torch.manual_seed(0)
    cfg = tiny_cfg(tie_word_embeddings=False)
    model = NEO(cfg)
    set_trainable(model, "pretrain")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = train.configure_optimizers(model, 0.01, 1e-3, (0.9, 0.95))
    ids = torch.tensor([[1, 2] + span(cfg, 2, 2) + [3, 4, 5]])
    tg = torch.tensor([[2] + [IGNORE_INDEX] * 6 + [3, 4, 5, 6]])
    _, loss = model(ids, [torch.randn(3, 64, 64)], tg)
    loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    hw = ("q_proj_hw", "k_proj_hw", "q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w")
    expected = {k for k in before if k.startswith(("vision.", "pre_buffer."))
                or any(f"self_attn.{h}." in k for h in hw)}
    assert "post_llm.1.self_attn.k_proj_hw.weight" in expected and "vision.dense_embedding.bias" in expected
    assert changed == expected
    set_trainable(model, "sft")
    assert all(p.requires_grad for p in model.parameters())


def test_toy_overfits_one_batch():
    """A toy model overfits one image-caption batch: the caption loss falls by at least 10x."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = NEO(cfg)
    cap = list(b"a red circle")
    ids = torch.tensor([[257] + span(cfg, 2, 2) + cap[:-1]])
    tg = torch.tensor([[IGNORE_INDEX] * 6 + cap])
    img = [torch.randn(3, 64, 64)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        _, loss = model(ids, img, tg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_loss_weights_and_ignore():
    """Ignored targets carry no loss; weights give sum(w * CE) / sum(w)."""
    torch.manual_seed(0)
    model = NEO(tiny_cfg())
    ids = torch.tensor([[1, 2, 3, 4]])
    tg = torch.tensor([[2, IGNORE_INDEX, 4, 5]])
    w = torch.tensor([[1.0, 0.0, 0.5, 0.5]])
    logits, loss = model(ids, targets=tg, loss_weights=w)
    ce = F.cross_entropy(logits[0], torch.tensor([2, 0, 4, 5]), reduction="none")
    assert torch.allclose(loss, (ce[0] + 0.5 * ce[2] + 0.5 * ce[3]) / 2.0, atol=1e-6)
    _, plain = model(ids, targets=tg)
    assert torch.allclose(plain, (ce[0] + ce[2] + ce[3]) / 3, atol=1e-6)


def test_flops_and_presets():
    """Presets have the released checkpoints' sizes; FLOPs per token grow with the context."""
    c = NEOConfig.preset("neo-2b")
    assert (c.n_layer_total, c.d_model, c.n_head, c.n_kv_head, c.d_mlp, c.tie_word_embeddings) == (40, 2048, 16, 8, 6144, True)
    c = NEOConfig.preset("neo-9b")
    assert (c.n_layer_total, c.d_model, c.n_head, c.d_mlp, c.tie_word_embeddings) == (42, 4096, 32, 12288, False)
    with pytest.raises(ValueError, match="toy"):
        NEOConfig.preset("nope")
    m = NEO(tiny_cfg())
    assert m.flops_per_token(512) > m.flops_per_token(64) > 6 * 0.5 * m.num_params()
