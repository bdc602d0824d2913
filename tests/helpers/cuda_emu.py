"""Run CUDA kernels of cuda/ on the CPU through cuda_emu.h, so that tests check their logic where there is no GPU.

`build(source, defines, wrappers)` takes the source as the launchers hand it to NVRTC
(bytemamba.ops._cupy.read_source: local headers pasted in), rewrites each inline-PTX statement into the
emulation's function for it (an unknown one is an error naming it), appends `wrappers` (extern "C" launch
functions), compiles with g++ and loads the library (cached by the text's hash). The emulation runs a block's
threads as OS threads, so it is slow: tests keep shapes small.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bytemamba.ops._cupy import read_source

HERE = Path(__file__).resolve().parent

# PTX opcode (the template's first word) -> C++ for it, from the statement's outputs (o) and inputs (i).
_PTX = {
    "ex2.approx.ftz.f32": lambda o, i: f"{o[0]} = emu::ex2({i[0]})",
    "ex2.approx.f32": lambda o, i: f"{o[0]} = emu::ex2({i[0]})",
    "lg2.approx.ftz.f32": lambda o, i: f"{o[0]} = emu::lg2({i[0]})",
    "tanh.approx.f32": lambda o, i: f"{o[0]} = emu::tanh_({i[0]})",
    "cvt.f32.f16": lambda o, i: f"{o[0]} = emu::h2f({i[0]})",
    "cvt.rn.bf16.f32": lambda o, i: f"{o[0]} = emu::f2bf({i[0]})",
    "cvt.rn.f16.f32": lambda o, i: f"{o[0]} = emu::f2h({i[0]})",
    "cvta.to.shared.u64": lambda o, i: f"{o[0]} = emu::smem_addr({i[0]})",
    "ld.shared.v4.f32": lambda o, i: (f"{{ const float4 emu_v = emu::lds4({i[0]}); {o[0]} = emu_v.x; {o[1]} = emu_v.y; "
                                      f"{o[2]} = emu_v.z; {o[3]} = emu_v.w; }}"),
    "cp.async.cg.shared.global": lambda o, i: f"emu::cp16({i[0]}, {i[1]})",
    "cp.async.commit_group": lambda o, i: "(void)0",
    "cp.async.wait_group": lambda o, i: "(void)0",
    # predicated stores "{ .reg .pred q; setp.ne.u32 q, p, 0; @q st.global.T [dst], v; }": inputs p, dst, v
    "st.global.f32": lambda o, i: f"if ({i[0]}) *reinterpret_cast<float*>({i[1]}) = {i[2]}",
    "st.global.u16": lambda o, i: f"if ({i[0]}) *reinterpret_cast<unsigned short*>({i[1]}) = {i[2]}",
}
_ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside brackets and string literals."""
    parts, depth, cur, quoted = [], 0, "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "([{":
            depth += 1
        elif not quoted and ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _operands(section: str) -> list[str]:
    """`"=f"(y), "f"(x)` -> ["y", "x"]."""
    out = []
    for op in _split_top(section, ","):
        op = op.strip()
        if op:
            m = re.fullmatch(r'"[^"]*"\s*\((.*)\)', op, re.S)
            if m is None:
                raise ValueError(f"cuda_emu: cannot read the asm operand {op!r}")
            out.append(m.group(1))
    return out


def translate(src: str) -> str:
    """The source with every `asm(...)` statement replaced by its emulation and `smem_raw` bound to the block's
    shared memory."""
    out, pos = [], 0
    for m in _ASM.finditer(src):
        if m.start() < pos:
            continue
        depth, j = 1, m.end()
        while depth:                                   # the statement's closing parenthesis
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            j += 1
        body = src[m.end():j - 1]
        sections = _split_top(body, ":")
        template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0]))
        words = [w for w in re.split(r"[\s{};]+", template.replace("\\n", " ")) if w]
        op = next((w for w in words if w in _PTX), None)
        if op is None:
            raise ValueError(f"cuda_emu: no emulation for the PTX {template!r}")
        outs = _operands(sections[1]) if len(sections) > 1 else []
        ins = _operands(sections[2]) if len(sections) > 2 else []
        out += [src[pos:m.start()], _PTX[op](outs, ins)]
        pos = j
    text = "".join(out) + src[pos:]
    return re.sub(r"extern\s+__shared__\s+float4\s+smem_raw\[\];", "#define smem_raw (emu::smem())", text)


def compiler() -> str | None:
    return shutil.which("g++")


def build(source: str, defines: dict, wrappers: str) -> ctypes.CDLL:
    """The kernels of cuda/`source` with `defines` ({NAME: value}) plus `wrappers`, compiled for this CPU."""
    text = '#include "cuda_emu.h"\n' + translate(read_source(source)) + "\n" + wrappers
    flags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    key = hashlib.sha256((text + " ".join(flags) + (HERE / "cuda_emu.h").read_text()).encode()).hexdigest()[:20]
    cache = Path(tempfile.gettempdir()) / "bytemamba_cuda_emu"
    cache.mkdir(exist_ok=True)
    lib = cache / f"{key}.so"
    if not lib.exists():
        cpp = cache / f"{key}.cpp"
        cpp.write_text(text)
        tmp = cache / f"{key}.{os.getpid()}.so"
        r = subprocess.run([compiler(), "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-w", f"-I{HERE}",
                            *flags, str(cpp), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuda_emu: g++ failed on {source} {flags}:\n{r.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))
