import torch, json, os
from driftwood.model.cuda import kernels as K
B, H, Hkv, D, cap = 3, 8, 2, 64, 600
res = {"adaptive": [0, 0, 0], "combine": [0, 0, 0], "seeds": 0, "max_rel": 0.0}
for seed in range(300):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).bfloat16().cuda()
    kc = torch.randn(4, Hkv, cap, D, generator=g).bfloat16().cuda(); vc = torch.randn(4, Hkv, cap, D, generator=g).bfloat16().cuda()
    for p in (torch.tensor([5, 0, 517]), torch.tensor([191, 192, 599])):
        p = p.cuda()
        two = K.attention(q, kc[:B], vc[:B], p)
        a = K.attention(q, kc[:B], vc[:B], p, adaptive=True)
        c = K.attention(q, kc[:B], vc[:B], p, combine=True)
        for b in range(B):
            res["adaptive"][b] += int(not torch.equal(a[b], two[b]))
            res["combine"][b] += int(not torch.equal(c[b], two[b]))
        res["max_rel"] = max(res["max_rel"], float(((a.float() - two.float()).abs() / two.float().abs().clamp_min(1e-3)).max()))
    res["seeds"] += 1
print(json.dumps(res))
json.dump(res, open(os.environ.get("OUT", "/tmp") + "/attn-seeds.json", "w"))
