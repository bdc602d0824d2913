"""Small helpers shared by our CuPy launchers (scan_cuda.py, step.py): PyTorch's current stream as a CuPy
stream, raw pointers as kernel arguments, a per-process cache of NVRTC-compiled modules, and
cuLaunchKernelEx with launch attributes (launch_ex: PDL, cooperative).

Launching on PyTorch's current stream with the tensors' own device pointers is what lets the kernels run
inside a captured CUDA graph (the pointers are captured by value, so they must be static buffers there).
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from pathlib import Path

import numpy as np
import torch

# Where the kernel sources are: cuda/ at the repository root (a source checkout or an editable install), or
# bytemamba/cuda/ inside an installed wheel (pyproject.toml maps the package bytemamba.cuda onto cuda/).
SOURCE_DIRS = (Path(__file__).resolve().parents[2] / "cuda", Path(__file__).resolve().parents[1] / "cuda")


def kernel_source(name: str) -> Path:
    """The path of the kernel source `name` (e.g. "selective_scan.cu"): the first of SOURCE_DIRS that holds it."""
    for d in SOURCE_DIRS:
        if (d / name).is_file():
            return d / name
    raise RuntimeError(f"kernel source {name} not found in {' or '.join(str(d) for d in SOURCE_DIRS)} "
                       "(a broken install: reinstall bytemamba)")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.M)


def read_source(name: str) -> str:
    """The text of kernel source `name` with its local includes (`#include "x.cuh"`, found like `name`)
    pasted in place, each file once (as include guards would: a cycle ends), with #line marks so that
    compiler messages name the right file and line. NVRTC compiles one string, and CuPy's on-disk kernel
    cache is keyed by that string: pasting the headers in (rather than passing -I) makes a change to a
    header change the key."""
    done: set = set()

    def expand(n: str) -> str:
        lines = kernel_source(n).read_text().split("\n")
        out = []
        for i, line in enumerate(lines, 1):
            m = _INCLUDE.match(line)
            if m is None:
                out.append(line)
                continue
            h = m.group(1)
            if h not in done:
                done.add(h)
                out += [f'#line 1 "{h}"', expand(h)]
            out.append(f'#line {i + 1} "{n}"')
        return "\n".join(out)

    done.add(name)
    return expand(name)


_streams: dict = {}
_modules: dict = {}
_lock = threading.Lock()
compile_times: dict = {}          # (source name, options, device) -> seconds spent compiling it


def cupy_stream(device: torch.device):
    """CuPy's view of PyTorch's current stream on `device` (cached per stream pointer)."""
    import cupy

    ts = torch.cuda.current_stream(device)
    ptr = ts.cuda_stream
    s = _streams.get((device.index, ptr))
    if s is None:
        try:
            s = cupy.cuda.Stream.from_external(ts)
        except Exception:
            s = cupy.cuda.ExternalStream(ptr, device.index)
        _streams[(device.index, ptr)] = s
    return s


_sms: dict = {}


def num_sms(device: torch.device) -> int:
    """The device's multiprocessor count (cached per device index)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sms:
        _sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sms[idx]


def ptr(t: torch.Tensor | None):
    """A tensor's device pointer as a kernel argument (0 for None)."""
    return np.uint64(0 if t is None else t.data_ptr())


def compile_module(source: str, options: tuple, device: torch.device, names: tuple):
    """Compile the kernel source `source` (cuda/<source>) with NVRTC for `device` (once per process and option set) and return
    {kernel name: cupy function}. `-arch` for the device is added here."""
    import cupy

    major, minor = torch.cuda.get_device_capability(device)
    key = (source, tuple(options), major, minor, device.index)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        t0 = time.perf_counter()
        with cupy.cuda.Device(device.index):
            m = cupy.RawModule(code=read_source(source), backend="nvrtc",
                               options=("--std=c++17", f"-arch=sm_{major}{minor}", *options))
            mod = {n: m.get_function(n) for n in names}
        compile_times[key] = time.perf_counter() - t0
        _modules[key] = mod
        return mod


# ---- cuLaunchKernelEx with launch attributes (the PDL step kernels, the cooperative persistent step) ----------

class LaunchAttr(ctypes.Structure):          # CUlaunchAttribute (cuda.h): id, pad to 8, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):        # CUlaunchConfig (cuda.h)
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint), ("bx", ctypes.c_uint),
                ("by", ctypes.c_uint), ("bz", ctypes.c_uint), ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttr)), ("nattrs", ctypes.c_uint)]


LAUNCH_COOPERATIVE = 2          # CU_LAUNCH_ATTRIBUTE_COOPERATIVE: the driver checks that every CTA is resident
LAUNCH_PDL = 6                  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
LAUNCH_CLUSTER_DIM = 4          # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: value (x, y, z)
_ARG_TYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
              np.float32: ctypes.c_float}
_libcuda = None


def libcuda():
    """The CUDA driver library (ctypes), loaded once: cuLaunchKernelEx here, cuOccupancyMaxActiveClusters in
    fused_step."""
    global _libcuda
    if _libcuda is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        _libcuda = lib
    return _libcuda


def launch_ex(device: torch.device, fn, grid, block: int, args, smem: int, attrs: tuple, who: str):
    """Launch CuPy RawKernel `fn` by cuLaunchKernelEx on PyTorch's current stream with launch attributes `attrs`:
    an id (LAUNCH_PDL, LAUNCH_COOPERATIVE) is set to 1, an (id, values) pair to those values (e.g.
    (LAUNCH_CLUSTER_DIM, (2, 1, 1))). grid: an int or a tuple of up to 3; args: numpy scalars (ptr() for
    pointers). A failure raises one line starting with `who`."""
    vals = [_ARG_TYPES[type(a)](a.item()) for a in args]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    at = (LaunchAttr * len(attrs))()
    for a, i in zip(at, attrs):
        a.id, values = (i, (1,)) if isinstance(i, int) else i
        for k, v in enumerate(values):
            a.value[k] = v
    g = (tuple(grid) if isinstance(grid, tuple) else (grid,)) + (1, 1)
    cfg = LaunchConfig(g[0], g[1], g[2], block, 1, 1, smem, torch.cuda.current_stream(device).cuda_stream,
                        at, len(attrs))
    import cupy
    with cupy.cuda.Device(device.index):
        rc = libcuda().cuLaunchKernelEx(ctypes.byref(cfg), fn.kernel.ptr, params, None)   # CuPy RawKernel -> CUfunction
    if rc != 0:
        raise RuntimeError(f"{who}: cuLaunchKernelEx (attributes {attrs}) failed with CUresult {rc}")
