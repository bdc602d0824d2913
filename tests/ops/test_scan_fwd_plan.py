"""The scan forward's launch plan (bytemamba/ops/scan_cuda.py, _grid / _fwd_wants_small): pure arithmetic, no GPU.

It picks one of the forward's two builds (128-thread blocks of 64 channels at n = 16, 3 an SM; or 64-thread blocks of
32 channels, 4 an SM by shared memory) and the parallel L-segments; the kernel relies on every tile being in exactly
one segment and every channel in exactly one block.
"""

import pytest

from bytemamba.ops import scan_cuda

SMS = 132                                       # an H200
DEFAULT, SMALL = (64, 3), (32, 4)               # (channels a block, blocks an SM) of the bf16, n = 16 builds


def plan(shape):
    b, d, L, _ = shape
    ntiles = -(-L // scan_cuda.TL)
    dblocks, nseg, seg_tiles = scan_cuda._grid(b, d, ntiles, *DEFAULT, SMS)
    small = scan_cuda._fwd_wants_small(b * dblocks * nseg, DEFAULT[1], SMS)
    if small:
        dblocks, nseg, seg_tiles = scan_cuda._grid(b, d, ntiles, *SMALL, SMS)
    return small, dblocks, nseg, seg_tiles


def test_design_shapes():
    """The main shape (256 default blocks: 1.94 an SM, one wave) takes the 64-thread build in one segment; the shapes
    of several waves keep the default; the long one is split into segments that fill 3 blocks an SM."""
    assert plan((8, 2048, 8192, 16)) == (True, 64, 1, 128)
    assert plan((64, 1536, 1024, 16)) == (False, 24, 1, 16)
    assert plan((16, 4096, 2048, 16)) == (False, 64, 1, 32)
    assert plan((1, 2048, 131072, 16)) == (False, 32, 12, 171)


@pytest.mark.parametrize("shape", [(8, 2048, 8192, 16), (1, 2048, 131072, 16), (1, 1, 1, 1), (2, 3, 300_001, 64),
                                   (2, 40_000, 5, 4), (4, 1000, 700, 16), (1, 8448, 64, 16)])
def test_every_channel_and_tile_once(shape, monkeypatch):
    monkeypatch.delenv("BYTEMAMBA_SCAN_NSEG", raising=False)
    small, dblocks, nseg, seg_tiles = plan(shape)
    cpb = (SMALL if small else DEFAULT)[0]
    b, d, L, _ = shape
    ntiles = -(-L // scan_cuda.TL)
    assert dblocks * cpb >= d > (dblocks - 1) * cpb
    assert 1 <= nseg <= ntiles and (nseg - 1) * seg_tiles < ntiles <= nseg * seg_tiles
    if small:                                   # only where the default would leave an SM's third slot empty
        assert b * -(-d // DEFAULT[0]) <= 2 * SMS


def test_the_small_build_is_only_for_a_partial_single_wave():
    assert scan_cuda._fwd_wants_small(264, 3, SMS) and not scan_cuda._fwd_wants_small(265, 3, SMS)
    assert not scan_cuda._fwd_wants_small(100, 2, SMS)     # a build that runs 2 an SM anyway gains nothing
