"""Every .cu file in cuda/ compiles for sm_80 and sm_90 (CPU only: through nvcc or NVRTC, whichever is here)."""

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
PACKAGES = sorted(p.parent for p in (CUDA_DIR.parent / "bytemamba").rglob("__init__.py"))
# The specialisations the launchers compile: (IN_DTYPE, NPAD, HAS_Z, HAS_RESET, POLY_J).
VARIANTS = [(1, 16, 1, 0, 0), (0, 64, 0, 1, 5), (2, 32, 1, 1, 0)]
# Other builds behind knobs (the forward's 64-thread build the launcher picks, FWD_CPT 1 / 4), compiled at the first
# specialisation (docs/PERF.md names what each is for).
KNOB_BUILDS = {"selective_scan.cu": [["-DFWD_NTHR=64", "-DFWD_MINB=4"], ["-DFWD_CPT=1"], ["-DFWD_CPT=4"]]}


def _nvrtc():
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        return nvrtc
    except Exception:
        return None


def _defines(v):
    dt, npad, hz, hr, poly = v
    return [f"-DIN_DTYPE={dt}", f"-DNPAD={npad}", f"-DHAS_Z={hz}", f"-DHAS_RESET={hr}", f"-DPOLY_J={poly}"]


def _builds(src):
    return [_defines(v) for v in VARIANTS] + [_defines(VARIANTS[0]) + k for k in KNOB_BUILDS.get(src.name, [])]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_cu_compiles(src, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc:
        for defs in _builds(src):
            r = subprocess.run([nvcc, f"-arch={arch}", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "k.o"),
                                "-Werror", "all-warnings", *defs], capture_output=True, text=True)
            assert r.returncode == 0, f"{src.name} {arch} {defs}:\n{r.stderr}"
        return
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("neither nvcc nor NVRTC (cuda-bindings) is available to compile CUDA sources")
    from bytemamba.ops._cupy import read_source
    code = read_source(src.name).encode()              # what the launchers hand NVRTC: headers pasted in
    for defs in _builds(src):
        err, prog = nvrtc.nvrtcCreateProgram(code, src.name.encode(), 0, [], [])
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
        opts = [b"--std=c++17", f"-arch={arch}".encode(), *[s.encode() for s in defs]]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            pytest.fail(f"{src.name} {arch} {defs}:\n{log.decode(errors='replace')}")


# ---- the kernel sources ship with the package ------------------------------------------------------------

def test_pyproject_ships_every_kernel_source_and_package():
    """A plain `pip install .` wheel must carry cuda/*.cu (as bytemamba/cuda/) and every Python package; the
    package list is explicit in pyproject.toml, so a new subpackage or a moved kernel directory fails here."""
    import tomllib
    st = tomllib.loads((CUDA_DIR.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    root = CUDA_DIR.parent
    listed = set(st["packages"])
    found = {".".join(p.relative_to(root).parts) for p in PACKAGES}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert st["package-dir"]["bytemamba.cuda"] == "cuda"
    patterns = st["package-data"]["bytemamba.cuda"]
    shipped = SOURCES + sorted(CUDA_DIR.glob("*.cuh"))
    assert SOURCES and all(any(p.match(g) for g in patterns) for p in shipped)


def test_kernel_source_checkout_then_installed_layout(tmp_path, monkeypatch):
    from bytemamba.ops import _cupy
    assert _cupy.kernel_source("selective_scan.cu") == CUDA_DIR / "selective_scan.cu"
    # an installed wheel: no cuda/ beside site-packages' parent, the sources in bytemamba/cuda/
    (tmp_path / "site" / "cuda").mkdir(parents=True)            # e.g. cuda-python's own `cuda` package
    (tmp_path / "site" / "bytemamba" / "cuda").mkdir(parents=True)
    (tmp_path / "site" / "bytemamba" / "cuda" / "k.cu").write_text("// k")
    monkeypatch.setattr(_cupy, "SOURCE_DIRS", (tmp_path / "site" / "cuda", tmp_path / "site" / "bytemamba" / "cuda"))
    assert _cupy.kernel_source("k.cu").read_text() == "// k"
    with pytest.raises(RuntimeError, match=r"kernel source missing\.cu not found in .*reinstall"):
        _cupy.kernel_source("missing.cu")


def test_read_source_pastes_local_headers_once_with_line_marks(tmp_path, monkeypatch):
    from bytemamba.ops import _cupy
    (tmp_path / "k.cu").write_text('#include <cuda_bf16.h>\n#include "h.cuh"\nint a;\n  # include "h.cuh"\nint b;')
    (tmp_path / "h.cuh").write_text('#include "g.cuh"\nint h;')
    (tmp_path / "g.cuh").write_text("int g;")
    monkeypatch.setattr(_cupy, "SOURCE_DIRS", (tmp_path,))
    text = _cupy.read_source("k.cu")
    assert text.split("\n") == ['#include <cuda_bf16.h>', '#line 1 "h.cuh"', '#line 1 "g.cuh"', 'int g;',
                                 '#line 2 "h.cuh"', 'int h;', '#line 3 "k.cu"', 'int a;', '#line 5 "k.cu"', 'int b;']
    (tmp_path / "g.cuh").write_text('#include "h.cuh"\n#include "k.cu"\nint g;')     # a cycle: pasted once, ends
    assert _cupy.read_source("k.cu").count("int g;") == 1 and _cupy.read_source("k.cu").count("int a;") == 1
    (tmp_path / "k.cu").write_text('#include "missing.cuh"')
    with pytest.raises(RuntimeError, match=r"kernel source missing\.cuh not found"):
        _cupy.read_source("k.cu")
