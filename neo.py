"""
NEO, a native vision-language model, in one file ("From Pixels to Words", arXiv 2510.14979; NEO-ov, arXiv
2605.28820). No vision encoder: raw pixels go through two small convolutions straight into one decoder-only
transformer, which learns to see and to speak at once. Notable features, each a numbered section below:
  1. PatchEmbed: Conv(16 px) -> GELU -> 2-D rotary rotation of the patch features -> Conv(2x2): one visual
     token covers 32x32 pixels at the image's native resolution.
  2. Native-RoPE indices (build_positions): every token carries (t, h, w); an image of any size uses one t.
  3. The mixed mask (build_attention_mask): causal over text, bidirectional inside one image.
  4. Multi-head native attention (Attention): q/k have the LLM's own T channels (base 1e6) plus D extra H/W
     channels (base 1e4) with their own norms.
  5. Pre-Buffer / Post-LLM (NEO.forward): L_pre new layers in front of a pretrained Qwen3.
The math is the NEO paper's §3.1 as the authors' code computes it (VLMTrainKit/neo/model/modeling_neo_qwen3.py
and modeling_neo_vit.py there), and reproduces their logits (python -m pytest -q test_neo.py).

    from neo import NEO; NEO.from_pretrained("out/final")   # used by train.py and sample.py
    python sample.py --draw_mask mask.png                   # this file's indices and mask, drawn
"""
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # the one "no loss here" value, in targets everywhere

# -----------------------------------------------------------------------------
# Config


@dataclass
class NEOConfig:
    # language model (Qwen3 names in comments)
    vocab_size: int = 576            # the toy "shapes" tokenizer (data.py): 561 ids, padded to a multiple of 64
    d_model: int = 256               # hidden_size
    n_layer: int = 4                 # Post-LLM layers: the pretrained LLM's own
    n_pre_layers: int = 2            # Pre-Buffer layers: new, in front of the LLM
    n_head: int = 8                  # num_attention_heads
    n_kv_head: int = 4               # num_key_value_heads (grouped-query attention)
    head_dim: int = 32               # D; the q/k vectors have 2D channels: T (D) + H (D/2) + W (D/2)
    d_mlp: int = 704                 # intermediate_size (SwiGLU)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6          # T axis, the LLM's own base
    rope_theta_hw: float = 1e4       # H and W axes
    tie_word_embeddings: bool = True
    max_seq_len: int = 1024          # longest sequence generate() preallocates a cache for
    # vision: pixels -> tokens
    patch_size: int = 16
    downsample: int = 2              # 2x2 patches -> one token, so one token = 32x32 px
    vision_dim: int = 128            # C_v, channels of the 16-px patch features (1024 in NEO)
    rope_theta_vision: float = 1e4   # 2-D rotation of patch features
    patch_rope: bool = True          # ablation switch (ablate.py); NEO: on. False skips that rotation
    min_pixels: int = 64 * 64
    max_pixels: int = 256 * 256
    # special token ids (from the tokenizer; these are the toy bytes tokenizer's)
    img_start_id: int = 259          # <img>
    img_end_id: int = 260            # </img>
    img_context_id: int = 261        # <IMG_CONTEXT>, replaced by one visual token each
    # ablation switches (NEO paper Table 3): native|1d, mixed|causal
    rope: str = "native"
    mask: str = "mixed"
    attn: str = "auto"               # auto|sdpa|flex|math, see attention()

    def __post_init__(self):
        assert self.n_head % self.n_kv_head == 0, f"n_head {self.n_head} not a multiple of n_kv_head {self.n_kv_head}"
        assert self.head_dim % 4 == 0, "head_dim must split into H and W halves of even size"
        assert self.vision_dim % 4 == 0, "vision_dim must split into x and y halves of even size"
        assert self.rope in ("native", "1d"), f"rope must be native or 1d, got {self.rope}"
        assert self.mask in ("mixed", "causal"), f"mask must be mixed or causal, got {self.mask}"
        assert self.attn in ("auto", "sdpa", "flex", "math"), f"attn must be auto|sdpa|flex|math, got {self.attn}"

    @property
    def n_layer_total(self):
        return self.n_pre_layers + self.n_layer

    @property
    def token_px(self):  # pixels per visual token side
        return self.patch_size * self.downsample

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# what both released sizes share (a checkpoint's own config/tokenizer always overrides the image token ids)
NEO_SHARED = dict(vocab_size=151936, max_seq_len=8192, vision_dim=1024, min_pixels=256 * 256,
                  max_pixels=2048 * 2048, img_start_id=151670, img_end_id=151671, img_context_id=151669)
PRESETS = {
    "toy": dict(),  # ~5.4M parameters: trains on a 2-core CPU in minutes; NEO's architecture, smaller sizes
    # NEO-2.2B = Qwen3-1.7B (28 layers) + 12 Pre-Buffer layers; NEO-9B = Qwen3-8B (36, untied) + 6 (their config.json)
    "neo-2b": dict(**NEO_SHARED, d_model=2048, n_layer=28, n_pre_layers=12, n_head=16, n_kv_head=8, head_dim=128,
                   d_mlp=6144, tie_word_embeddings=True),
    "neo-9b": dict(**NEO_SHARED, d_model=4096, n_layer=36, n_pre_layers=6, n_head=32, n_kv_head=8, head_dim=128,
                   d_mlp=12288, tie_word_embeddings=False),
}

# -----------------------------------------------------------------------------
# Primitives


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(pos, dim, theta):
    """cos/sin for rotate-half RoPE over `dim` channels at integer positions pos (...) -> (..., dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    freqs = pos.float()[..., None] * inv_freq            # (..., dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)              # channel i pairs with i + dim/2
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin, halves):
    """x * cos + rotate_half(x) * sin for consecutive parts of x's channels at once (halves: each part's two half
    sizes, cos/sin: NEO.rope_tables'). rotate_half(x1, x2) = (-x2, x1): channel i turns with channel i + half."""
    p = x.split(halves, dim=-1)  # (x1, x2) of each part: T1 T2 H1 H2 W1 W2 (native), T1 T2 (1d)
    rotated = torch.cat([h for x1, x2 in zip(p[0::2], p[1::2]) for h in (-x2, x1)], dim=-1)  # rotate_half, each part
    return (x * cos + rotated * sin).to(x.dtype)


def rope_interleaved(x, pos, theta):
    """RoPE with interleaved pairs (channels 2i, 2i+1), as the authors rotate patch features. x (N, C)."""
    C = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, C, 2, device=x.device, dtype=torch.float32) / C)
    ang = pos.float()[:, None] * inv_freq                # (N, C/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]                  # (N, C/2) each
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)  # (N, C)


# -----------------------------------------------------------------------------
# 1. Pixels to tokens


class PatchEmbed(nn.Module):
    """(3, H, W) pixels -> (H/32 * W/32, d_model) visual tokens, row-major. No vision encoder, two convolutions:
    Conv(16 px, stride 16) -> GELU -> 2-D rotation of the patch features -> Conv(2x2, stride 2)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.vision_dim, cfg.patch_size, stride=cfg.patch_size)
        self.dense_embedding = nn.Conv2d(cfg.vision_dim, cfg.d_model, cfg.downsample, stride=cfg.downsample)

    def rotate(self, x, rows, cols):
        """The only absolute position signal NEO has: of each 16-px patch's features x (N, C), the first C/2 rotate
        with its column (x), the last C/2 with its row (y); in float32, as the authors do."""
        if not self.cfg.patch_rope:  # ablation: no absolute position in the patch features at all
            return x
        C, theta, y = x.shape[-1], self.cfg.rope_theta_vision, x.float()
        return torch.cat((rope_interleaved(y[:, :C // 2], cols, theta),
                          rope_interleaved(y[:, C // 2:], rows, theta)), dim=-1).to(x.dtype)

    def forward_reference(self, img):
        """The paper's pixels -> tokens written out literally, for one (3, H, W) image (forward computes the same)."""
        pe, de = self.patch_embedding, self.dense_embedding
        x = F.gelu(F.conv2d(img[None], pe.weight, pe.bias, stride=self.cfg.patch_size))  # (1, C, gh, gw)
        _, C, gh, gw = x.shape
        rows, cols = torch.arange(gh, device=img.device), torch.arange(gw, device=img.device)
        x = self.rotate(x[0].flatten(1).T, rows.repeat_interleave(gw), cols.repeat(gh))  # (gh*gw, C) row-major
        x = F.conv2d(x.T.reshape(1, C, gh, gw), de.weight, de.bias, stride=self.cfg.downsample)  # (1, d, gh/2, gw/2)
        return x[0].flatten(1).T                                                   # (N, d_model) row-major

    def forward(self, images):
        """images: one (3, H, W) tensor or a list of them -> (sum of H/32 * W/32, d_model), image after image.
        The same two convolutions as forward_reference, written as matmuls: stride = kernel, so each conv is one
        matmul over non-overlapping patches, and all images' patches go through it together (faster on a CPU)."""
        images = [images] if torch.is_tensor(images) else images
        C, p, s = self.cfg.vision_dim, self.cfg.patch_size, self.cfg.downsample
        patches, rows, cols, group, n = [], [], [], [], 0
        for img in images:
            gh, gw = img.shape[1] // p, img.shape[2] // p     # the 16-px grid
            x = img.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4)  # (gh, gw, 3, p, p)
            patches.append(x.reshape(gh * gw, 3 * p * p))     # (N16, 3*p*p) row-major, conv weight's order
            rows.append(torch.arange(gh, device=img.device).repeat_interleave(gw))
            cols.append(torch.arange(gw, device=img.device).repeat(gh))
            # the s x s patches that merge into each token, as indices into the concatenated patches
            idx = torch.arange(gh * gw, device=img.device).view(gh // s, s, gw // s, s).permute(0, 2, 1, 3)
            group.append(n + idx.reshape(-1, s * s))          # (N, s*s), kernel order (ky, kx)
            n += gh * gw
        w1 = self.patch_embedding.weight.view(C, -1)
        x = F.gelu(F.linear(torch.cat(patches), w1, self.patch_embedding.bias))  # (N16 total, C): conv 1
        x = self.rotate(x, torch.cat(rows), torch.cat(cols))
        x = x[torch.cat(group)].transpose(1, 2)              # (N, C, s*s): the dense conv's (c, ky, kx) order
        w2 = self.dense_embedding.weight.view(self.cfg.d_model, -1)
        return F.linear(x.reshape(x.shape[0], -1), w2, self.dense_embedding.bias)  # (N, d_model): conv 2


# -----------------------------------------------------------------------------
# 2. Native-RoPE indices and 3. the mixed mask


def build_positions(input_ids, grids, cfg, doc_ids=None):
    """(t, h, w) index of every token, plus which image each visual token belongs to.

    input_ids (B, L); grids: list of (rows, cols) token grids, one per image span in row-major order.
    Returns pos (3, B, L) long and img_id (B, L) long (-1 for text). Example, one document:
        tokens  a  b  <img> v v v v v v </img> c      (a 2x3-token image)
        t       0  1  2     3 3 3 3 3 3 4      5      all visual tokens of one image share one t
        h       0  0  0     0 0 0 1 1 1 0      0
        w       0  0  0     0 1 2 0 1 2 0      0
    t = cumsum(is_not_visual + follows_img_start) - 1, restarting at 0 for every packed document.
    """
    (B, L), dev = input_ids.shape, input_ids.device
    is_vis = input_ids == cfg.img_context_id
    if cfg.rope == "1d":  # ablation: every token, visual ones too, gets its own t
        step = torch.ones_like(input_ids)
    else:
        follows_start = torch.zeros_like(is_vis)
        follows_start[:, 1:] = input_ids[:, :-1] == cfg.img_start_id
        step = (~is_vis).long() + follows_start.long()
    c = step.cumsum(1)
    # restart per document: subtract the running count just before the document's first token
    if doc_ids is not None:
        idx = torch.arange(L, device=dev).expand(B, L)
        new_doc = torch.ones_like(is_vis)
        new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        start = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(1).values  # (B, L)
        before = F.pad(c, (1, 0))[:, :-1]                  # c at position i-1, 0 at i=0
        c = c - before.gather(1, start)
    t = c - 1
    # h, w: row and column on each image's own token grid, starting at (0, 0)
    h, w, img_id = torch.zeros_like(input_ids), torch.zeros_like(input_ids), torch.full_like(input_ids, -1)
    n_vis = int(is_vis.sum())
    n_expect = sum(r * c_ for r, c_ in grids)
    if n_vis != n_expect:
        raise ValueError(f"input_ids hold {n_vis} <IMG_CONTEXT> tokens but the images give {n_expect} "
                         f"visual tokens; build each span as <img> + (H/32)*(W/32) x <IMG_CONTEXT> + </img>")
    if n_vis:
        if cfg.rope == "native":  # each image's grid row-major, as boolean assignment fills the spans
            h[is_vis] = torch.cat([torch.arange(r, device=dev).repeat_interleave(c_) for r, c_ in grids])
            w[is_vis] = torch.cat([torch.arange(c_, device=dev).repeat(r) for r, c_ in grids])
        img_id[is_vis] = torch.cat([torch.full((r * c_,), k, device=dev) for k, (r, c_) in enumerate(grids)])
    return torch.stack((t, h, w)), img_id


def mask_rule(doc_q, doc_k, img_q, img_k, q_idx, k_idx, mixed=True):
    """allowed(i, j) = same_document AND (j <= i OR i and j are visual tokens of the same image)."""
    allowed = k_idx <= q_idx
    if mixed:
        allowed = allowed | ((img_q == img_k) & (img_q >= 0))
    return allowed & (doc_q == doc_k)


def build_attention_mask(doc_ids, img_id, mixed=True):
    """Boolean (B, 1, L, L) mask, True = may attend. For `a <img> v v </img> b` (one doc):
          a s v v e b
        a 1 . . . . .
        s 1 1 . . . .
        v 1 1 1 1 . .     the two visual tokens see each other (bidirectional inside the image)
        v 1 1 1 1 . .
        e 1 1 1 1 1 .     <img>/</img> are ordinary causal text tokens
        b 1 1 1 1 1 1
    """
    L = img_id.shape[1]
    idx = torch.arange(L, device=img_id.device)
    m = mask_rule(doc_ids[:, :, None], doc_ids[:, None, :], img_id[:, :, None], img_id[:, None, :],
                  idx[:, None], idx[None, :], mixed)
    return m[:, None]  # (B, 1, L, L)


def build_block_mask(doc_ids, img_id, mixed=True):
    """The same rule as a FlexAttention BlockMask: no L x L tensor is ever made (CUDA, long packs)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_rule(doc_ids[b, q_idx], doc_ids[b, kv_idx], img_id[b, q_idx], img_id[b, kv_idx],
                         q_idx, kv_idx, mixed)
    B, L = doc_ids.shape
    return create_block_mask(mask_mod, B, None, L, L, device=doc_ids.device)


_flex_attention, _flex_failed, _dense_of = None, False, (None, None)


def attention(q, k, v, mask, scale):
    """q (B, nh, L, 2D), k (B, nkv, S, 2D), v (B, nkv, S, D) -> (B, nh, L, D).
    mask: None (attend to everything: single-token decode), a bool (B, 1, L, S) tensor, or a BlockMask.
    If FlexAttention fails (it is reported not to compile for q/k this wide on GPUs with less shared memory than
    an H100), every BlockMask from then on becomes the dense boolean mask of its own rule, for SDPA."""
    global _flex_attention, _flex_failed, _dense_of
    if mask is not None and not isinstance(mask, torch.Tensor):  # BlockMask -> FlexAttention
        if not _flex_failed:
            try:
                if _flex_attention is None:
                    from torch.nn.attention.flex_attention import flex_attention
                    _flex_attention = torch.compile(flex_attention, dynamic=False)
                return _flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
            except Exception as e:  # a compile or launch error: say so once, then SDPA for good
                _flex_failed = True
                why = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"FlexAttention failed ({type(e).__name__}: {why}); SDPA with the mixed mask as a dense boolean "
                      f"mask from now on", file=sys.stderr)
        if _dense_of[0] is not mask:  # one dense mask per BlockMask, not one per layer
            from torch.nn.attention.flex_attention import create_mask
            _dense_of = (mask, create_mask(mask.mask_mod, q.shape[0], 1, *mask.seq_lengths, q.device))
        mask = _dense_of[1]   # (B, 1, L, S) bool, then the dense path below
    if q.device.type == "cpu" and (mask is None or q.requires_grad or q.shape[2] == 1):  # decoding, training: few ops
        return attention_math(q, k, v, mask, scale)
    if q.device.type == "cpu":  # a masked prefill: SDPA's fused kernel (2x the math path for a photo's 1,300
        # tokens, bf16) needs v as wide as q and k, so v gets zero channels that the output then drops
        D = v.shape[-1]
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - D)), attn_mask=mask, scale=scale,
                                              enable_gqa=True)[..., :D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def attention_math(q, k, v, mask, scale):
    """The masked softmax written out: on a CPU, SDPA with v narrower than q and k falls back to slower math (bf16:
    2-4x). GQA without copying k and v: the query heads that share a kv head are stacked along the query axis."""
    B, nh, L, _ = q.shape
    nkv, S, D = v.shape[1], v.shape[2], v.shape[3]
    rep = nh // nkv
    att = (q.reshape(B, nkv, rep * L, -1) @ k.transpose(-2, -1)).float() * scale  # (B, nkv, rep*L, S)
    if mask is not None:  # mask (B, 1, L, S) -> (B, 1, 1, L, S), the same for the rep heads of a group
        att = att.view(B, nkv, rep, L, S).masked_fill(~mask[:, :, None], float("-inf")).view(B, nkv, rep * L, S)
    y = att.softmax(-1).to(v.dtype) @ v                                                # (B, nkv, rep*L, D)
    return y.view(B, nh, L, D)


def attention_probs(q, k, mask, scale):
    """The attention matrix itself, (B, nh, L, S) in float32 (math path; also what --show_attention draws)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)  # GQA: each kv head serves n_head/n_kv_head heads
    att = (q @ k.transpose(-2, -1)).float() * scale
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.softmax(-1)


# -----------------------------------------------------------------------------
# 4. Multi-head native attention, and the rest of a Qwen3 layer


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        nh, nkv, D, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(d, nh * D, bias=False)      # the LLM's own T channels
        self.k_proj = nn.Linear(d, nkv * D, bias=False)
        self.v_proj = nn.Linear(d, nkv * D, bias=False)
        self.o_proj = nn.Linear(nh * D, d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        # NEO's addition: D more q/k channels per head that see only the h and w indices, so spatial
        # position gets its own frequencies (base 1e4) and its own norms without disturbing the LLM's T.
        self.q_proj_hw = nn.Linear(d, nh * D, bias=False)
        self.k_proj_hw = nn.Linear(d, nkv * D, bias=False)
        self.q_norm_h, self.q_norm_w = RMSNorm(D // 2, cfg.rms_norm_eps), RMSNorm(D // 2, cfg.rms_norm_eps)
        self.k_norm_h, self.k_norm_w = RMSNorm(D // 2, cfg.rms_norm_eps), RMSNorm(D // 2, cfg.rms_norm_eps)
        self.keep_attn, self.last_attn = False, None
        self.layer_idx = 0  # this layer's slot in a KVCache (NEO.__init__ numbers the layers)

    def forward(self, x, rope, mask, cache=None, index=None):
        B, L, _ = x.shape
        nh, nkv, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(B, L, nh, D))    # (B, L, nh, D): the LLM's own T channels
        k = self.k_norm(self.k_proj(x).view(B, L, nkv, D))   # (B, L, nkv, D)
        v = self.v_proj(x).view(B, L, nkv, D)
        if self.cfg.rope == "native":
            q_h, q_w = self.q_proj_hw(x).view(B, L, nh, D).chunk(2, dim=-1)    # (B, L, nh, D/2) each
            k_h, k_w = self.k_proj_hw(x).view(B, L, nkv, D).chunk(2, dim=-1)
            q = torch.cat((q, self.q_norm_h(q_h), self.q_norm_w(q_w)), dim=-1)  # (B, L, nh, 2D): [T | H | W]
            k = torch.cat((k, self.k_norm_h(k_h), self.k_norm_w(k_w)), dim=-1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)    # T by t (base 1e6), H by h and W by w (base 1e4)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, L, ch)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, index)  # (B, nkv, S, ch): the cache so far
        # the logit is q_t.k_t + q_h.k_h + q_w.k_w, scaled by 1/sqrt(D) (not 1/sqrt(2D)), as the authors do
        y = attention(q, k, v, mask, scale=1.0 / math.sqrt(D))   # (B, nh, L, D)
        if self.keep_attn:  # sample.py --show_attention sets this to read the attention map
            self.last_attn = attention_probs(q, k, mask, 1.0 / math.sqrt(D))
        return self.o_proj(y.transpose(1, 2).reshape(B, L, nh * D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache=None, index=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, index)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# 5. The model: Pre-Buffer then Post-LLM, and its KV cache for generate()

HW_NAMES = ("q_proj_hw", "k_proj_hw", "q_norm_h", "q_norm_w", "k_norm_h", "k_norm_w")


class KVCache:
    """Per-layer k/v buffers (B, heads, T, ch) allocated once, written in place (gpt-fast's pattern). Native-RoPE
    makes two counters differ: `length` (tokens cached), `next_t` (B,) (the next T index: an image uses one t).
    valid (B, T): the slots a new token may see (not left padding); upto: the slots a decode step reads."""

    def __init__(self, cfg, B, T, device, dtype):
        self.k = [torch.zeros(B, cfg.n_kv_head, T, 2 * cfg.head_dim if cfg.rope == "native" else cfg.head_dim,
                              device=device, dtype=dtype) for _ in range(cfg.n_layer_total)]
        self.v = [torch.zeros(B, cfg.n_kv_head, T, cfg.head_dim, device=device, dtype=dtype)
                  for _ in range(cfg.n_layer_total)]
        self.valid = torch.ones(B, T, dtype=torch.bool, device=device)
        self.slots = torch.arange(T, device=device)
        self.length, self.next_t, self.upto, self.padded = 0, None, None, False

    def update(self, i, k, v, index=None):
        """Layer i's new k, v (B, nkv, L, ch) -> what attention reads. A prompt (index None) goes after what is
        cached; a decode step's token to slot `index`, a (1,) tensor, so that a compiled step never changes."""
        kc, vc = self.k[i], self.v[i]
        if index is not None:
            kc[:, :, index], vc[:, :, index] = k, v
            return kc[:, :, :self.upto], vc[:, :, :self.upto]
        start, end = self.length, self.length + k.shape[2]
        assert end <= kc.shape[2], "KV cache full: raise max_seq_len"
        kc[:, :, start:end], vc[:, :, start:end] = k, v
        if i == len(self.k) - 1:  # advance after the last layer
            self.length = end
        return kc[:, :, :end], vc[:, :, :end]


class NEO(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vision = PatchEmbed(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pre_buffer = nn.ModuleList(Block(cfg) for _ in range(cfg.n_pre_layers))  # new layers
        self.post_llm = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))         # the LLM's layers
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False  # train.py turns this on at full scale
        for i, block in enumerate([*self.pre_buffer, *self.post_llm]):
            block.self_attn.layer_idx = i
        self.compiled_decode = None  # decode_step compiled on first use (generate(compile=True))
        if not self.lm_head.weight.is_meta:  # checkpoint.load builds on the meta device and fills in weights
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, modules=None):
        """The one place weights are initialised, as VLMTrainKit/neo/model/modeling_neo_qwen3.py does the Pre-Buffer:
        Linear, Conv and Embedding weights N(0, 0.02), biases 0, norm scales 1. modules: only these (default all)."""
        for m in self.modules() if modules is None else modules:
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def embed(self, input_ids, images):
        """Token embeddings with each <IMG_CONTEXT> slot replaced by its visual token."""
        x = self.embed_tokens(input_ids)                  # (B, L, d)
        if images:
            vis = self.vision([img.to(x.dtype) for img in images])  # (N_vis, d)
            x = x.masked_scatter((input_ids == self.cfg.img_context_id)[..., None], vis.to(x.dtype))
        return x

    def rope_tables(self, pos, dtype=torch.float32):
        """Rotary tables from pos (3, B, L): cos, sin (B, L, 1, 2D) and the halves' sizes. Native-RoPE: channels
        [T | H | W] (D, D/2, D/2), each part rotated by its own index and base (t: 1e6, h and w: 1e4), all by one
        multiply-add; 1d: T alone. Built in float32, cast to the hidden states' dtype as the authors' Qwen3 does."""
        D, cfg = self.cfg.head_dim, self.cfg
        parts = [rope_cos_sin(pos[0], D, cfg.rope_theta)]
        if cfg.rope == "native":
            parts += [rope_cos_sin(pos[1], D // 2, cfg.rope_theta_hw), rope_cos_sin(pos[2], D // 2, cfg.rope_theta_hw)]
        halves = [c.shape[-1] // 2 for c, _ in parts for _ in range(2)]
        cos = torch.cat([c for c, _ in parts], dim=-1)       # (B, L, 2D)
        sin = torch.cat([s for _, s in parts], dim=-1)
        return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype), halves  # broadcast over heads

    def forward(self, input_ids, images=None, targets=None, doc_ids=None, loss_weights=None,
                cache=None, last_only=False):
        cfg, (B, L) = self.cfg, input_ids.shape
        for img in images or []:
            assert img.dim() == 3 and img.shape[1] % cfg.token_px == 0 and img.shape[2] % cfg.token_px == 0, \
                f"images must be (3, H, W) with H, W multiples of {cfg.token_px}, got {tuple(img.shape)}"
        assert doc_ids is None or doc_ids.shape == input_ids.shape, "doc_ids must have the shape of input_ids"
        grids = [(img.shape[1] // cfg.token_px, img.shape[2] // cfg.token_px) for img in images or []]
        if cache is not None and cache.length > 0:  # one token after the prompt
            assert L == 1, "decode one token at a time"
            return self.decode(input_ids, cache)[:, None], None
        # the prompt, with the mixed mask of section 3 above (a FlexAttention BlockMask for long packs on CUDA)
        pos, img_id = build_positions(input_ids, grids, cfg, doc_ids)
        docs = doc_ids if doc_ids is not None else torch.zeros_like(input_ids)
        use_flex = cfg.attn == "flex" or (cfg.attn == "auto" and input_ids.is_cuda and L >= 1024)
        mask = (build_block_mask if use_flex else build_attention_mask)(docs, img_id, cfg.mask == "mixed")
        if cache is not None:
            cache.next_t = pos[0][:, -1] + 1  # the last token's t + 1 (left padding: the prompt's t restarts at 0)
        x = self.embed(input_ids, images)
        rope = self.rope_tables(pos, x.dtype)
        for block in [*self.pre_buffer, *self.post_llm]:  # the new Pre-Buffer, then the pretrained Qwen3 layers
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None   # list index keeps the time dim
        logits = self.lm_head(x)
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
        w = (targets != IGNORE_INDEX if loss_weights is None else loss_weights).reshape(-1).float()
        return logits, (ce * w).sum() / w.sum().clamp(min=1e-8)  # sum(w * CE) / sum(w), w: data.collate's

    def decode(self, tok, cache, compiled=False):
        """tok (B, 1), the token after what cache holds -> next-token logits (B, V); the cache advances by one."""
        cache.upto = None if compiled else cache.length + 1  # compiled: every slot, so that the shapes stay put
        index = torch.full((1,), cache.length, device=tok.device)
        logits = (self.compiled_decode if compiled else self.decode_step)(tok, cache.next_t, index, cache)
        cache.next_t, cache.length = cache.next_t + 1, cache.length + 1
        return logits

    def decode_step(self, tok, t, index, cache):
        """One new token per row after the prompt: tok (B, 1) at T index t (B,) (h = w = 0, as text), written to cache
        slot index (1,) -> next-token logits (B, V). Tensors in, tensors out: compiled once, it runs every step."""
        B = tok.shape[0]
        pos = torch.stack((t[:, None], torch.zeros_like(tok), torch.zeros_like(tok)))   # (3, B, 1)
        mask = None  # eager without padding: every slot read may be seen
        if cache.upto is None or cache.padded:
            mask = (cache.valid & (cache.slots <= index))[:, None, None, :cache.upto]    # (B, 1, 1, S): itself and before
        x = self.embed_tokens(tok)
        rope = self.rope_tables(pos, x.dtype)
        for block in [*self.pre_buffer, *self.post_llm]:
            x = block(x, rope, mask, cache, index)
        return self.lm_head(self.norm(x)).view(B, -1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ---- generation

    @torch.inference_mode()
    def generate_stream(self, input_ids, images=None, max_new_tokens=64, temperature=0.0, top_k=None,
                        eos_id=None, seed=None, use_cache=True, vocab_limit=None, top_p=None, repetition_penalty=1.0,
                        pad_mask=None, compile=False):
        """Yield new token ids one at a time (ints if B = 1, else (B,) tensors): prefill once with the mixed mask, then
        a decode_step per token through the KV cache; use_cache=False re-runs the whole sequence each step (the tests'
        reference). vocab_limit: the tokenizer's size (no padding id is emitted); sampling: as sample_next.
        pad_mask (B, L): True at left padding, for prompts of different lengths; the padding is a document of its own,
        so each prompt gets the (t, h, w) and mask it would get alone. compile=True: decode_step compiled, reading a
        cache of a power of two slots; compiling takes tens of seconds on a CPU, so it pays for many tokens or rows."""
        B, L = input_ids.shape
        dev = input_ids.device
        assert pad_mask is None or use_cache, "a padded batch needs the cache"
        doc_ids = None if pad_mask is None else (~pad_mask).long()  # (B, L): 0 = padding, 1 = the prompt
        # every id so far, prompt included, for the repetition penalty (Hugging Face penalises the prompt too);
        # padding counts as the prompt's last id, already seen
        seen = input_ids if pad_mask is None else torch.where(pad_mask, input_ids[:, -1:], input_ids)
        seen = torch.cat((seen, input_ids.new_zeros(B, max_new_tokens)), 1) if repetition_penalty != 1.0 else None
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        T = L + max_new_tokens  # compiled: a power of two, so that the shapes change only every doubling
        T = min(1 << (T - 1).bit_length() if compile else T, max(self.cfg.max_seq_len, L + 1))
        cache = KVCache(self.cfg, B, T, dev, next(self.parameters()).dtype) if use_cache else None
        if pad_mask is not None:
            cache.valid[:, :L], cache.padded = ~pad_mask, True
        logits = self(input_ids, images, doc_ids=doc_ids, cache=cache, last_only=True)[0][:, -1]   # (B, V)
        if compile and self.compiled_decode is None:
            self.compiled_decode = torch.compile(self.decode_step, dynamic=False)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        no_img = [self.cfg.img_start_id, self.cfg.img_end_id, self.cfg.img_context_id]
        for i in range(max_new_tokens):
            logits[:, no_img] = float("-inf")  # never emit an image span: there is no image to put in it
            if vocab_limit:  # nor an id past the tokenizer (the vocabulary's padding): it cannot be decoded
                logits[:, vocab_limit:] = float("-inf")
            nxt = sample_next(logits, temperature, top_k, gen, top_p, repetition_penalty,
                              None if seen is None else seen[:, :L + i])  # (B,)
            if seen is not None:
                seen[:, L + i] = nxt
            yield int(nxt[0]) if B == 1 else nxt
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    return
            if i == max_new_tokens - 1 or (use_cache and L + i + 1 > T):
                return
            if use_cache:  # the new token alone: the cache holds the rest, images included
                logits = self.decode(nxt[:, None], cache, compile)
            else:
                input_ids = torch.cat((input_ids, nxt[:, None]), dim=1)
                logits = self(input_ids, images, last_only=True)[0][:, -1]

    def generate(self, input_ids, images=None, **kw):
        """-> (B, n_new) new token ids (stops early once every row has produced eos_id); kw: generate_stream's."""
        toks = [torch.as_tensor(t, device=input_ids.device).reshape(-1) for t in
                self.generate_stream(input_ids, images, **kw)]
        return torch.stack(toks, dim=1) if toks else input_ids.new_zeros(input_ids.shape[0], 0)

    # ---- checkpoints in the authors' layout (checkpoint.py holds the name maps and the file I/O)

    def save_pretrained(self, out_dir, layout="neo"):
        """config.json + model.safetensors in the authors' layout (layout="qwen3": the Post-LLM alone, as a Qwen3)."""
        import checkpoint
        checkpoint.save_pretrained(self, out_dir, layout)

    @classmethod
    def from_pretrained(cls, path, dtype=None, **overrides):
        """A released NEO folder, a Qwen3 folder or our ckpt.pt in `dtype` (None: its own); see checkpoint.load."""
        import checkpoint
        return checkpoint.load(path, dtype, **overrides)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (fwd + bwd): 6 per weight in a matmul, plus attention: per layer and
        head 2*L*(2D) for q.k and 2*L*D for att.v forward, times 3 for fwd+bwd (PaLM App. B style)."""
        cfg = self.cfg  # the embedding is a lookup, not a matmul; tied, it is the head's matmul, counted once
        n = self.num_params() - (0 if cfg.tie_word_embeddings else self.embed_tokens.weight.numel())
        qk = 2 * cfg.head_dim if cfg.rope == "native" else cfg.head_dim
        return 6 * n + 3 * cfg.n_layer_total * cfg.n_head * 2 * seq_len * (qk + cfg.head_dim)


def sample_next(logits, temperature=0.0, top_k=None, generator=None, top_p=None, repetition_penalty=1.0,
                prev_ids=None):
    """logits (B, V) -> (B,) token ids, in Hugging Face's order: the repetition penalty on every id in prev_ids (B, n)
    (a logit > 0 divided by it, one < 0 multiplied), temperature (0 = argmax), top_k (clamped to the vocabulary),
    top_p (the smallest set of likeliest tokens whose probability sums to >= top_p, at least one)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and prev_ids is not None:
        s = logits.gather(1, prev_ids)
        logits = logits.scatter(1, prev_ids, torch.where(s < 0, s * repetition_penalty, s / repetition_penalty))
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # max first: a tiny temperature gives -inf, not nan
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:  # as HF: drop the unlikeliest tokens while their total is <= 1 - top_p
        srt, idx = logits.sort(-1)  # ascending
        drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the likeliest token always stays
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def set_trainable(model, stage):
    """requires_grad per stage (paper §3.2). pretrain: exactly NEO's new parts, the patch embedding, every
    Pre-Buffer layer and the H/W q/k projections and norms of every layer (the authors' train_buffer switch in
    VLMTrainKit/neo/train/train.py is never applied); llm (toy only): exactly the rest, the text model; midtrain,
    sft and the toy's spatial: everything."""
    if stage not in ("llm", "pretrain", "midtrain", "spatial", "sft"):
        raise ValueError(f"unknown stage {stage!r}; choose llm, pretrain, midtrain, spatial or sft")
    for name, p in model.named_parameters():
        new = name.startswith(("vision.", "pre_buffer.")) or any(f".self_attn.{h}." in name for h in HW_NAMES)
        p.requires_grad = {"pretrain": new, "llm": not new}.get(stage, True)
