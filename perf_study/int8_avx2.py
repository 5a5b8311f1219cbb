import sys, torch
import torch._inductor.config as ic
if len(sys.argv) > 1: ic.cpp.simdlen = int(sys.argv[1])
exec(open('perf_study/int8_attn.py').read().split("ref = bench")[0])
print("capability", torch.backends.cpu.get_cpu_capability(), "simdlen", ic.cpp.simdlen)
bench("fp32 fused compiled", torch.compile(_decode_reduction), q, kf, vf, block_ids, mask, scale)
bench("int8 gather+deq+sdpa eager", gather_sdpa, q, k8, v8, ks, vs, block_ids, mask, scale)
bench("int8 fused compiled", torch.compile(int8_fused), q, k8, v8, ks, vs, block_ids, mask, scale)
def int8_i16(q, k, v, ksc, vsc, block_ids, mask, scale):
    n, num_blocks = block_ids.shape
    _, block_size, kv_heads, head_dim = k.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads
    kk = k[block_ids].to(torch.int16).to(q.dtype) * ksc[block_ids].unsqueeze(-1)
    vv = v[block_ids].to(torch.int16).to(q.dtype) * vsc[block_ids].unsqueeze(-1)
    kk = kk.view(n, num_keys, kv_heads, 1, head_dim)
    vv = vv.view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    qq = q.view(n, 1, kv_heads, group, head_dim)
    s = (qq * kk).sum(-1) * scale
    s = s.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    p = s.softmax(1).view(n, num_blocks, block_size, kv_heads, group, 1)
    return (p * vv).sum(2).sum(1).view(n, kv_heads*group, head_dim)
bench("int8 fused via int16", torch.compile(int8_i16), q, k8, v8, ks, vs, block_ids, mask, scale)
bench("int8 scale-on-scores", torch.compile(int8_scorescale), q, k8, v8, ks, vs, block_ids, mask, scale)
def dense_red(q, k8g, v8g, ksg, vsg, mask, scale):
    # k8g: (n, m, bs, kvh, hd) int8 contiguous copies
    n, num_blocks, block_size, kv_heads, head_dim = k8g.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads
    kk = (k8g.to(q.dtype) * ksg.unsqueeze(-1)).view(n, num_keys, kv_heads, 1, head_dim)
    vv = (v8g.to(q.dtype) * vsg.unsqueeze(-1)).view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    qq = q.view(n, 1, kv_heads, group, head_dim)
    s = (qq * kk).sum(-1) * scale
    s = s.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    p = s.softmax(1).view(n, num_blocks, block_size, kv_heads, group, 1)
    return (p * vv).sum(2).sum(1).view(n, kv_heads*group, head_dim)
cdense = torch.compile(dense_red)
def hybrid(q, k, v, ksc, vsc, block_ids, mask, scale):
    return cdense(q, k[block_ids], v[block_ids], ksc[block_ids], vsc[block_ids], mask, scale)
bench("int8 eager gather + compiled dense", hybrid, q, k8, v8, ks, vs, block_ids, mask, scale)
def hybrid2(q, k, v, ksc, vsc, block_ids, mask, scale):
    kk = k[block_ids].float() * ksc[block_ids].unsqueeze(-1)
    vv = v[block_ids].float() * vsc[block_ids].unsqueeze(-1)
    return cdense2(q, kk, vv, mask, scale)
def dense2(q, kk, vv, mask, scale):
    n, num_blocks, block_size, kv_heads, head_dim = kk.shape
    num_keys = num_blocks * block_size
    group = q.shape[1] // kv_heads
    kk = kk.view(n, num_keys, kv_heads, 1, head_dim)
    vv = vv.view(n, num_blocks, block_size, kv_heads, 1, head_dim)
    qq = q.view(n, 1, kv_heads, group, head_dim)
    s = (qq * kk).sum(-1) * scale
    s = s.masked_fill(~mask.view(n, num_keys, 1, 1), float("-inf"))
    p = s.softmax(1).view(n, num_blocks, block_size, kv_heads, group, 1)
    return (p * vv).sum(2).sum(1).view(n, kv_heads*group, head_dim)
cdense2 = torch.compile(dense2)
bench("int8 eager gather+deq + compiled dense fp32", hybrid2, q, k8, v8, ks, vs, block_ids, mask, scale)
