"""One forward + backward of the CUDA scan at one shape, for `ncu` (device runs only)."""
import sys

import torch

from bytemamba.ops.scan import selective_scan

b, d, L, n = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8,2048,8192,16").split(","))
g = torch.Generator(device="cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
ins = [r(b, d, L).bfloat16(), (r(b, d, L) * 0.5 - 1).bfloat16(), -torch.exp(r(d, n) * 0.5 + 0.5),
       r(b, n, L).bfloat16(), r(b, n, L).bfloat16(), r(d), r(b, d, L).bfloat16(), r(d) * 0.3]
ins = [t.requires_grad_(True) for t in ins]
for _ in range(2):
    out = selective_scan(*ins, True, backend="cuda")
    out.backward(torch.randn_like(out))
torch.cuda.synchronize()
