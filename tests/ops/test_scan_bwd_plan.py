"""The scan backward's launch plan (bytemamba/ops/scan_cuda.py, _bwd_plan): pure arithmetic, no GPU needed.

It decides the channel blocks, the parallel L-segments and the blocks an SM; the kernel (cuda/scan_bwd.cu)
relies on every tile being in exactly one segment and no segment being empty.
"""

import pytest

from bytemamba.ops import scan_cuda

SMS, SMEM_SM, BS = 132, 233472, 74624          # an H200; the bf16, n = 16 build's shared memory


@pytest.mark.parametrize("shape", [(8, 2048, 8192, 16), (1, 2048, 131072, 16), (64, 1536, 1024, 16),
                                   (16, 4096, 2048, 16), (1, 1, 1, 1), (2, 3, 300_001, 64), (2, 40_000, 5, 4)])
def test_plan_covers_every_tile_once(shape, monkeypatch):
    monkeypatch.delenv("BYTEMAMBA_SCAN_NSEG", raising=False)
    b, d, L, n = shape
    npad = scan_cuda._npad(n)
    dblocks, nseg, seg_tiles, bps, smem = scan_cuda._bwd_plan(b, d, L, npad, 3, BS, SMS, SMEM_SM)
    ntiles = -(-L // scan_cuda.TL)
    assert dblocks * (scan_cuda.NTHREADS // (npad // 4)) >= d > (dblocks - 1) * (scan_cuda.NTHREADS // (npad // 4))
    assert 1 <= nseg <= ntiles and (nseg - 1) * seg_tiles < ntiles <= nseg * seg_tiles
    assert bps in (2, 3) and smem >= BS
    if bps == 2:                                   # asks for enough shared memory that a third block cannot fit
        assert SMEM_SM // (smem + 1024) == 2


def test_plan_of_the_design_shapes():
    """The main shape (512 blocks) runs 2 blocks an SM in one segment (whole waves); the long one is split into
    segments that fill the GPU at 3 blocks an SM."""
    main = scan_cuda._bwd_plan(8, 2048, 8192, 16, 3, BS, SMS, SMEM_SM)
    assert main[:4] == (64, 1, 128, 2)
    long = scan_cuda._bwd_plan(1, 2048, 131072, 16, 3, BS, SMS, SMEM_SM)
    assert long[:4] == (64, 6, 342, 3) and long[4] == BS


def test_forced_segments(monkeypatch):
    monkeypatch.setenv("BYTEMAMBA_SCAN_NSEG", "7")
    _, nseg, seg_tiles, _, _ = scan_cuda._bwd_plan(2, 8, 5000, 16, 3, BS, SMS, SMEM_SM)
    assert (nseg, seg_tiles) == (7, 12)             # 79 tiles in 7 segments of 12 (the last one 7)
