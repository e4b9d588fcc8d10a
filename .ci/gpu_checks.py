"""
What the CPU test suite cannot check: the CUDA paths. Run on a machine with a GPU (never in CI):

    python .ci/gpu_checks.py          # ~1-2 min: prints one line per check and exits 1 if any fails

1. the authors' tiny NEO on the GPU in float32 reproduces their logits (and how far bf16 autocast drifts);
2. FlexAttention (BlockMask, the training path on CUDA for long packs) equals SDPA with the dense mask, in
   the forward and in every parameter's gradient, at NEO-2B's head sizes (q/k 256, v 128);
3. cached greedy generation equals uncached generation on the GPU.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from neo import NEO, NEOConfig  # noqa: E402
from conftest import span, tiny_cfg  # noqa: E402  (the tests' helpers: an image span, the tiny config)

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False  # compare in true float32
failed = []


def check(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failed.append(name)


print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")

# 1. the authors' logits
fix = os.path.join(HERE, "assets", "neo_official_tiny")
model = NEO.from_pretrained(fix).to(dev).eval()
case = torch.load(os.path.join(fix, "case.pt"), weights_only=True)
with torch.no_grad():
    ids, imgs = case["input_ids"][None].to(dev), [im.to(dev) for im in case["images"]]
    logits, _ = model(ids, imgs)
    err = (logits[0].cpu() - case["logits"]).abs().max().item()
    with torch.autocast(dev, dtype=torch.bfloat16):
        lb, _ = model(ids, imgs)
    err_bf = (lb[0].float().cpu() - case["logits"]).abs().max().item()
check("authors' logits, float32", err <= 1e-4, f"max |diff| {err:.2e} (bf16 autocast: {err_bf:.2e}, "
      f"logit scale {case['logits'].abs().max().item():.2f})")

# 2. FlexAttention == SDPA, forward and backward, NEO-2B head sizes, one pack of 4 documents with images
torch.manual_seed(0)
cfg = NEOConfig.preset("toy", d_model=256, n_layer=2, n_pre_layers=1, n_head=2, n_kv_head=1, head_dim=128,
                       d_mlp=512, vision_dim=64, max_seq_len=2048)
model = NEO(cfg).to(dev)
L, row, docs = 1536, [], []
for d in range(4):  # text, a 4x6-token image (128x192 pixels), text, a 2x2-token image, text
    doc = [5 + d] * 50 + span(cfg, 4, 6) + [9] * 100 + span(cfg, 2, 2) + [7] * 150
    row += doc
    docs += [d] * len(doc)
row += [0] * (L - len(row))
docs += [-1] * (L - len(docs))
ids, doc_ids = torch.tensor([row], device=dev), torch.tensor([docs], device=dev)
targets = torch.where(doc_ids >= 0, ids.roll(-1, 1), -100)
imgs = [torch.randn(3, *hw, device=dev) for _ in range(4) for hw in ((128, 192), (64, 64))]
grads = {}
for attn in ("sdpa", "flex"):
    model.cfg.attn = attn
    model.zero_grad()
    logits, loss = model(ids, imgs, targets, doc_ids)
    loss.backward()
    grads[attn] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
(la, ga), (lb, gb) = grads["sdpa"], grads["flex"]
gerr = max(((ga[n] - gb[n]).norm() / ga[n].norm().clamp_min(1e-12)).item() for n in ga)
ferr = (la - lb).abs().max().item()
check("FlexAttention == SDPA, float32", ferr < 1e-3 and gerr < 1e-3 and ga.keys() == gb.keys(),
      f"logits max |diff| {ferr:.2e}, worst relative grad diff {gerr:.2e} over {len(ga)} tensors")
with torch.autocast(dev, dtype=torch.bfloat16):
    out = {}
    for attn in ("sdpa", "flex"):
        model.cfg.attn = attn
        out[attn] = model(ids, imgs, targets, doc_ids)[1].item()
check("FlexAttention == SDPA, bf16 loss", abs(out["sdpa"] - out["flex"]) < 2e-2,
      f"loss sdpa {out['sdpa']:.4f}, flex {out['flex']:.4f}")

# 3. cached == uncached greedy decoding
torch.manual_seed(0)
cfg = tiny_cfg()
model = NEO(cfg).to(dev).eval()
for p in model.parameters():  # sharper logits, so the greedy path is not decided by rounding
    p.data.mul_(5.0) if p.dim() > 1 else None
ids = torch.tensor([[1, 2] + span(cfg, 2, 3) + [3, 4]], device=dev)
img = [torch.randn(3, 64, 96, device=dev)]
a = model.generate(ids, img, max_new_tokens=16)
b = model.generate(ids, img, max_new_tokens=16, use_cache=False)
check("cached == uncached generation", a.tolist() == b.tolist(), f"{a[0].tolist()}")

print("all GPU checks passed" if not failed else f"FAILED: {', '.join(failed)}")
sys.exit(1 if failed else 0)
