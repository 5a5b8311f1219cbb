import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
def _decode_reduction(q, k, v, block_ids, mask, scale):
    return int8_fused_noscale(q, k, v, block_ids, mask, scale)
def int8_fused_noscale(q, k, v, block_ids, mask, scale):
    n, num_blocks = block_ids.shape
    _, block_size, kv_heads, head_dim = k.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads
    kk = k[block_ids].to(q.dtype).view(n, num_keys, kv_heads, 1, head_dim)
    vv = v[block_ids].to(q.dtype).view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    qq = q.view(n, 1, kv_heads, group, head_dim)
    s = (qq * kk).sum(-1) * scale
    s = s.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    p = s.softmax(1).view(n, num_blocks, block_size, kv_heads, group, 1)
    return (p * vv).sum(2).sum(1).view(n, kv_heads*group, head_dim)
n, m, bs, kvh, hd, group = 16, 20, 16, 3, 64, 3
NB = 2000
torch.manual_seed(0)
kf = torch.randn(NB, bs, kvh, hd); vf = torch.randn(NB, bs, kvh, hd)
k8 = (kf*30).round().clamp(-127,127).to(torch.int8); v8 = (vf*30).round().clamp(-127,127).to(torch.int8)
ks = torch.rand(NB, bs, kvh) / 30; vs = torch.rand(NB, bs, kvh) / 30
q = torch.randn(n, kvh*group, hd)
block_ids = torch.randint(1, NB, (n, m))
mask = torch.ones(n, m*bs, dtype=torch.bool)
scale = hd ** -0.5

def int8_fused(q, k, v, ksc, vsc, block_ids, mask, scale):
    n, num_blocks = block_ids.shape
    _, block_size, kv_heads, head_dim = k.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads
    kk = k[block_ids].to(torch.int32).to(q.dtype) * ksc[block_ids].unsqueeze(-1)
    vv = v[block_ids].to(torch.int32).to(q.dtype) * vsc[block_ids].unsqueeze(-1)
    kk = kk.view(n, num_keys, kv_heads, 1, head_dim)
    vv = vv.view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    qq = q.view(n, 1, kv_heads, group, head_dim)
    s = (qq * kk).sum(-1) * scale
    s = s.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    p = s.softmax(1).view(n, num_blocks, block_size, kv_heads, group, 1)
    return (p * vv).sum(2).sum(1).view(n, kv_heads*group, head_dim)

def int8_scorescale(q, k, v, ksc, vsc, block_ids, mask, scale):
    # scales applied to scores / probs instead of to each element
    n, num_blocks = block_ids.shape
    _, block_size, kv_heads, head_dim = k.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads
    kk = k[block_ids].view(n, num_keys, kv_heads, 1, head_dim)
    qq = q.view(n, 1, kv_heads, group, head_dim)
    s = (qq * kk).sum(-1) * (ksc[block_ids].view(n, num_keys, kv_heads, 1) * scale)
    s = s.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    p = s.softmax(1) * vsc[block_ids].view(n, num_keys, kv_heads, 1)
    p = p.view(n, num_blocks, block_size, kv_heads, group, 1)
    vv = v[block_ids].view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    return (p * vv).sum(2).sum(1).view(n, kv_heads*group, head_dim)

def gather_sdpa(q, k, v, ksc, vsc, block_ids, mask, scale):
    flat = block_ids.reshape(-1)
    kk = (k.index_select(0, flat).float() * ksc.index_select(0, flat).unsqueeze(-1)).view(n, m*bs, kvh, hd)
    vv = (v.index_select(0, flat).float() * vsc.index_select(0, flat).unsqueeze(-1)).view(n, m*bs, kvh, hd)
    qq = q.view(n, kvh*group, 1, hd)
    kk = kk.permute(0, 2, 1, 3).repeat_interleave(group, 1)
    vv = vv.permute(0, 2, 1, 3).repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask.view(n,1,1,-1), scale=scale).view(n, kvh*group, hd)

def bench(name, fn, *args):
    with torch.inference_mode():
        for _ in range(3): out = fn(*args)
        t = time.perf_counter(); N = 30
        for _ in range(N): fn(*args)
        print(f"{name:30s} {1000*(time.perf_counter()-t)/N:7.3f} ms")
    return out

ref = bench("fp32 fused compiled", torch.compile(_decode_reduction), q, kf, vf, block_ids, mask, scale)
o1 = bench("int8 gather+deq+sdpa eager", gather_sdpa, q, k8, v8, ks, vs, block_ids, mask, scale)
o2 = bench("int8 fused .to(int32) compiled", torch.compile(int8_fused), q, k8, v8, ks, vs, block_ids, mask, scale)
o3 = bench("int8 fused scale-on-scores", torch.compile(int8_scorescale), q, k8, v8, ks, vs, block_ids, mask, scale)
print((o1-o2).abs().max(), (o1-o3).abs().max())

def int8_direct(q, k, v, ksc, vsc, block_ids, mask, scale):
    n, num_blocks = block_ids.shape
    _, block_size, kv_heads, head_dim = k.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads
    kk = k[block_ids].to(q.dtype) * ksc[block_ids].unsqueeze(-1)
    vv = v[block_ids].to(q.dtype) * vsc[block_ids].unsqueeze(-1)
    kk = kk.view(n, num_keys, kv_heads, 1, head_dim)
    vv = vv.view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    qq = q.view(n, 1, kv_heads, group, head_dim)
    s = (qq * kk).sum(-1) * scale
    s = s.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    p = s.softmax(1).view(n, num_blocks, block_size, kv_heads, group, 1)
    return (p * vv).sum(2).sum(1).view(n, kv_heads*group, head_dim)
o4 = bench("int8 fused direct .to(float)", torch.compile(int8_direct), q, k8, v8, ks, vs, block_ids, mask, scale)
print((o1-o4).abs().max())
ks16, vs16 = ks.half(), vs.half()
o5 = bench("int8 fused int32, fp16 scales", torch.compile(int8_fused), q, k8, v8, ks16, vs16, block_ids, mask, scale)
k8f = kf.clamp(-448, 448).to(torch.float8_e4m3fn); v8f = vf.clamp(-448,448).to(torch.float8_e4m3fn)
o6 = bench("fp8 fused compiled", torch.compile(_decode_reduction), q, k8f, v8f, block_ids, mask, scale)
def g2(q, k, v, block_ids, mask, scale):
    flat = block_ids.reshape(-1)
    kk = k.index_select(0, flat).float().view(n, m*bs, kvh, hd).permute(0, 2, 1, 3)
    vv = v.index_select(0, flat).float().view(n, m*bs, kvh, hd).permute(0, 2, 1, 3)
    return F.scaled_dot_product_attention(q.view(n, kvh*group, 1, hd), kk, vv, attn_mask=mask.view(n,1,1,-1), scale=scale, enable_gqa=True).view(n, kvh*group, hd)
o7 = bench("fp8 gather sdpa", g2, q, k8f, v8f, block_ids, mask, scale)
print((o6-o7).abs().max())
