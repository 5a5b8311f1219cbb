import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
n, m, bs, kvh, hd, group = 16, 20, 16, 3, 64, 3
NB = 2741
torch.manual_seed(0)
kf = torch.randn(NB, bs, kvh, hd); vf = torch.randn(NB, bs, kvh, hd)
k8 = (kf*30).round().clamp(-127,127).to(torch.int8); v8 = (vf*30).round().clamp(-127,127).to(torch.int8)
ks = torch.rand(NB, bs, kvh) / 30; vs = torch.rand(NB, bs, kvh) / 30
q = torch.randn(n, kvh*group, hd)
block_ids = torch.randint(1, NB, (n, m))
mask = torch.ones(n, 1, 1, m*bs, dtype=torch.bool)
scale = hd ** -0.5
def sdpa(k, v):
    return F.scaled_dot_product_attention(q.unsqueeze(2), k.view(n, -1, kvh, hd).transpose(1, 2), v.view(n, -1, kvh, hd).transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True)
def auto():
    flat = block_ids.reshape(-1)
    return sdpa(kf.index_select(0, flat), vf.index_select(0, flat))
def cur():
    flat = block_ids.reshape(-1)
    k = k8.index_select(0, flat).to(torch.float32) * ks.index_select(0, flat).unsqueeze(-1)
    v = v8.index_select(0, flat).to(torch.float32) * vs.index_select(0, flat).unsqueeze(-1)
    return sdpa(k, v)
def inplace():
    flat = block_ids.reshape(-1)
    k = k8.index_select(0, flat).to(torch.float32).mul_(ks.index_select(0, flat).unsqueeze(-1))
    v = v8.index_select(0, flat).to(torch.float32).mul_(vs.index_select(0, flat).unsqueeze(-1))
    return sdpa(k, v)
def mixed():
    flat = block_ids.reshape(-1)
    k = k8.index_select(0, flat) * ks.index_select(0, flat).unsqueeze(-1)
    v = v8.index_select(0, flat) * vs.index_select(0, flat).unsqueeze(-1)
    return sdpa(k, v)
def i8conv():
    # gather int8 first then convert into a preallocated buffer
    flat = block_ids.reshape(-1)
    kb = torch.empty(flat.numel(), bs, kvh, hd); vb = torch.empty_like(kb)
    kb.copy_(k8.index_select(0, flat)).mul_(ks.index_select(0, flat).unsqueeze(-1))
    vb.copy_(v8.index_select(0, flat)).mul_(vs.index_select(0, flat).unsqueeze(-1))
    return sdpa(kb, vb)
def bench(name, fn):
    with torch.inference_mode():
        for _ in range(5): out = fn()
        t = time.perf_counter(); N = 50
        for _ in range(N): fn()
        print(f"{name:12s} {1000*(time.perf_counter()-t)/N:7.3f} ms")
    return out
r = bench("auto fp32", auto)
for name, fn in [("current", cur), ("inplace", inplace), ("mixed", mixed), ("copy_+mul_", i8conv)]:
    o = bench(name, fn)
