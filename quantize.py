"""
Weight-only int8 for inference (sample.py and eval.py --quantize=int8), gpt-fast's quantize.py pattern: every
nn.Linear's weight becomes int8 with one float scale per output channel (symmetric: w ~ q * s, q in -127..127,
s = max|w_row| / 127); activations stay in the model's dtype. Decoding one token reads every weight once, so
it reads half the bytes of bf16 (a quarter of float32). A tied embedding shares the head's int8 matrix and
scales (a row of the head is a token's embedding), so the tie holds and there is no second copy.

    from quantize import quantize_int8
    print(quantize_int8(model))   # in place; -> one line saying what was quantised
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

_NO_KERNEL = set()  # (device type, dtype) where _weight_int8pack_mm raised: the dequantising matmul there


def quantize_per_channel(w):
    """w (N, K) float -> q (N, K) int8 and scales (N,) in w's dtype, w[n] ~ q[n] * scales[n]: symmetric per
    output row, scale = max|w[n]| / 127 (an all-zero row gets scale 1 and q = 0)."""
    amax = w.detach().float().abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(w.dtype)  # rounded as stored
    q = torch.round(w.detach().float() / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (q * s).T without making q * s: torch's _weight_int8pack_mm (CPU, and where else torch has it) takes
    2-D x and scales of x's dtype; elsewhere q is cast to x's dtype and the product scaled per column."""

    def __init__(self, q, scales):
        super().__init__()
        self.out_features, self.in_features = q.shape
        # a parameter (never trained), so num_params and parameters() still see the whole model
        self.weight = q if isinstance(q, nn.Parameter) else nn.Parameter(q, requires_grad=False)
        self.register_buffer("scales", scales)

    def forward(self, x):
        s = self.scales.to(x.dtype)
        key = (x.device.type, x.dtype)
        if key not in _NO_KERNEL:
            try:
                y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, s)
                return y.view(*x.shape[:-1], self.out_features)
            except (RuntimeError, NotImplementedError):
                _NO_KERNEL.add(key)
        return F.linear(x, self.weight.to(x.dtype)) * s


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows and per-row scales: a lookup dequantises only the rows it reads."""

    def __init__(self, q, scales):
        super().__init__()
        self.weight = q if isinstance(q, nn.Parameter) else nn.Parameter(q, requires_grad=False)
        self.register_buffer("scales", scales)

    def forward(self, ids):
        return F.embedding(ids, self.weight).to(self.scales.dtype) * self.scales[ids, None]


def weight_bytes(model):
    """Bytes of the model's parameters and buffers, each tensor once (a tied weight is one tensor)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


@torch.no_grad()
def quantize_int8(model):
    """Replace every nn.Linear of model by an Int8Linear, and the embedding by an Int8Embedding (the head's int8
    matrix when they are tied), in place; -> one line: what was quantised, bytes before and after."""
    before = weight_bytes(model)
    tied = model.lm_head.weight is model.embed_tokens.weight
    n = 0
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.Linear) and m.bias is None:  # NEO's Linears have no bias
                setattr(parent, name, Int8Linear(*quantize_per_channel(m.weight)))
                n += 1
    if tied:
        model.embed_tokens = Int8Embedding(model.lm_head.weight, model.lm_head.scales)
    else:
        model.embed_tokens = Int8Embedding(*quantize_per_channel(model.embed_tokens.weight))
    after = weight_bytes(model)
    return (f"int8: {n} Linear layers (lm_head included) and the token embedding"
            f"{' (tied to lm_head: one int8 matrix)' if tied else ''}, per output channel; weights "
            f"{before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB; the patch convolutions and norms unchanged")
