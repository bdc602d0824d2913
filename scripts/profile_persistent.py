"""Launches of the persistent decode-step kernel alone (byte353m, 53 layers, batch 64, bf16), for ncu (device runs only:
`-k persistent_step -s 3 -c 1`; scripts/device_ncu_persistent.sh)."""
import torch
from bytemamba.config import ModelConfig
from bytemamba.models.lm import ByteMambaLM
from bytemamba.ops import persistent_step as ps
torch.manual_seed(0)
with torch.device("cuda"):
    m = ByteMambaLM(ModelConfig(d_model=1024, n_layer=53)).eval()
W = m._fused_weights(torch.bfloat16)
P = ps.pack_persistent(W)
b = 64
cache = m.empty_cache(b, "cuda")
for s in cache.layers:
    s.conv.normal_()
    s.ssm.normal_().mul_(0.1)
ids = torch.randint(0, 256, (b,), device="cuda")
res = torch.empty(b, 1024, device="cuda")
for _ in range(4):
    ps.persistent_layers_fn(ids, P, W, [s.conv for s in cache.layers], [s.ssm for s in cache.layers], res)
torch.cuda.synchronize()
print("ok", float(res.abs().mean()))
