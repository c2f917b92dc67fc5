"""The three ways from a ``.cu`` text to an sm_90a cubin.

* ``nvcc``:        ``nvcc -cubin`` in a subprocess (always safe, slowest: ~1 s of driver overhead).
* ``nvrtc-ptxas``: NVRTC (``cuda.bindings.nvrtc``) to PTX in-process, then the toolkit's ``ptxas``
                   in a subprocess. The PTX ISA version must not be newer than that ptxas knows,
                   so NVRTC's (major, minor) must not exceed ptxas's.
* ``nvrtc``:       NVRTC straight to a cubin, in-process (fastest). NOTE: on CUDA 13.0 this
                   segfaults the whole process for kernels containing ``wgmma``
                   (shared/DEVICE_FACTS.md), which is why ``probe.py`` tries it in a child first.
Each returns ``(cubin bytes, compiler log)``; a failed compile raises ``CompileError`` with the log.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from . import env

kArch = "sm_90a"
kVirtualArch = "compute_90a"
kStd = "c++17"


class CompileError(RuntimeError):
    """A kernel failed to compile; the message carries the compiler's log."""


class CompilerUnavailable(RuntimeError):
    """This compile path cannot be used here (missing binary/library, version mismatch)."""


def _tool(name: str) -> Path:
    path = env.cuda_home() / "bin" / name
    if path.is_file():
        return path
    found = shutil.which(name)
    if found is None:
        raise CompilerUnavailable(f"{name} not found in {env.cuda_home() / 'bin'} nor on PATH "
                                  "(set MOE_FP8_CUDA_HOME or CUDA_HOME)")
    return Path(found)


@functools.lru_cache(maxsize=None)
def _tool_version_cached(path: str, stamp: tuple) -> tuple:
    text = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+), V([\d.]+)", text)
    if not match:
        raise CompilerUnavailable(f"cannot read the version of {path}: {text!r}")
    return int(match.group(1)), int(match.group(2)), match.group(3)


def tool_version(name: str) -> tuple:
    """``(major, minor, full)`` of nvcc/ptxas; raises CompilerUnavailable if missing."""
    path = _tool(name)
    stat = path.stat()
    return _tool_version_cached(str(path), (stat.st_size, stat.st_mtime_ns))


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as error:
        raise CompilerUnavailable(f"cuda.bindings.nvrtc is not importable ({error})") from None
    try:
        result, major, minor = nvrtc.nvrtcVersion()
    except Exception as error:  # the bindings import, but libnvrtc does not load
        raise CompilerUnavailable(f"libnvrtc cannot be loaded ({error})") from None
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompilerUnavailable(f"nvrtcVersion failed: {result}")
    return nvrtc


def nvrtc_version() -> tuple:
    """``(major, minor)`` of the libnvrtc that cuda.bindings loads."""
    _, major, minor = _nvrtc().nvrtcVersion()
    return int(major), int(minor)


def nvrtc_library() -> str:
    """Path of the loaded libnvrtc (for the toolchain fingerprint), '' if unknown."""
    _nvrtc()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libnvrtc.so" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return ""


def _include_flags() -> list[str]:
    return [f"-I{path}" for path in env.include_dirs()]


def flags(path: str) -> list[str]:
    """The flags of a compile path (part of the cache key)."""
    lineinfo = ["-lineinfo"] if env.lineinfo() else []
    if path == "nvcc":
        return ["-cubin", f"-gencode=arch={kVirtualArch},code={kArch}", f"-std={kStd}", "-O3",
                "-Xptxas", "-v", *lineinfo]
    if path == "nvrtc-ptxas":
        return [f"--gpu-architecture={kVirtualArch}", f"-std={kStd}", *lineinfo]
    if path == "nvrtc":
        return [f"--gpu-architecture={kArch}", f"-std={kStd}", "--ptxas-options=-v", *lineinfo]
    raise ValueError(f"unknown compile path {path!r}")


def ptxas_flags() -> list[str]:
    return [f"-arch={kArch}", "-O3", "-v", *(["-lineinfo"] if env.lineinfo() else [])]


def identity(path: str) -> str:
    """Compiler path + versions: part of every cache key; CompilerUnavailable if unusable."""
    if path == "nvcc":
        return f"nvcc {_tool('nvcc')} {tool_version('nvcc')}"
    ptxas = tool_version("ptxas")
    nvrtc = nvrtc_version()
    if path == "nvrtc-ptxas":
        if nvrtc > ptxas[:2]:
            raise CompilerUnavailable(
                f"NVRTC {nvrtc} writes PTX newer than ptxas {ptxas[2]} accepts; install "
                f"nvidia-cuda-nvrtc=={ptxas[0]}.{ptxas[1]}.* or force MOE_FP8_COMPILER=nvcc")
        return f"nvrtc {nvrtc} {nvrtc_library()} + ptxas {_tool('ptxas')} {ptxas}"
    if path == "nvrtc":
        return f"nvrtc {nvrtc} {nvrtc_library()}"
    raise ValueError(f"unknown compile path {path!r}")


def _run(command: list, what: str) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    log = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise CompileError(f"{what} failed (exit {done.returncode}):\n{' '.join(map(str, command))}"
                           f"\n{log}")
    return log


def compile_nvcc(tu: str, instance: str, workdir: Path) -> tuple[bytes, str]:
    source, cubin = workdir / "kernel.cu", workdir / "kernel.cubin"
    source.write_text(tu)
    log = _run([_tool("nvcc"), *flags("nvcc"), *_include_flags(), "-o", cubin, source], "nvcc")
    return cubin.read_bytes(), log


def _nvrtc_compile(tu: str, instance: str, options: list[str], what: str):
    """Compile ``tu`` with NVRTC, instantiating ``&instance``; returns (module, program, log).

    The caller destroys the program.
    """
    nvrtc = _nvrtc()
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    result, program = nvrtc.nvrtcCreateProgram(tu.encode(), b"kernel.cu", 0, [], [])
    if result != ok:
        raise CompileError(f"nvrtcCreateProgram failed: {result}")
    result, = nvrtc.nvrtcAddNameExpression(program, f"&{instance}".encode())
    if result != ok:
        nvrtc.nvrtcDestroyProgram(program)
        raise CompileError(f"nvrtcAddNameExpression(&{instance}) failed: {result}")
    encoded = [o.encode() for o in options]
    compiled, = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
    _, size = nvrtc.nvrtcGetProgramLogSize(program)
    buffer = b" " * size
    nvrtc.nvrtcGetProgramLog(program, buffer)
    log = buffer.rstrip(b"\0").decode(errors="replace").strip()
    if compiled != ok:
        nvrtc.nvrtcDestroyProgram(program)
        raise CompileError(f"{what} failed ({compiled.name}) with options {options}:\n{log}")
    return nvrtc, program, log


def compile_nvrtc_ptxas(tu: str, instance: str, workdir: Path) -> tuple[bytes, str]:
    options = [*flags("nvrtc-ptxas"), *_include_flags()]
    nvrtc, program, log = _nvrtc_compile(tu, instance, options, "NVRTC (to PTX)")
    try:
        _, size = nvrtc.nvrtcGetPTXSize(program)
        ptx = b" " * size
        nvrtc.nvrtcGetPTX(program, ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    ptx_path, cubin = workdir / "kernel.ptx", workdir / "kernel.cubin"
    ptx_path.write_bytes(ptx.rstrip(b"\0"))
    (workdir / "kernel.cu").write_text(tu)
    ptxas_log = _run([_tool("ptxas"), *ptxas_flags(), "-o", cubin, ptx_path], "ptxas")
    return cubin.read_bytes(), "\n".join(filter(None, [log, ptxas_log]))


def compile_nvrtc(tu: str, instance: str, workdir: Path) -> tuple[bytes, str]:
    options = [*flags("nvrtc"), *_include_flags()]
    nvrtc, program, log = _nvrtc_compile(tu, instance, options, "NVRTC (to cubin)")
    try:
        _, size = nvrtc.nvrtcGetCUBINSize(program)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(program, cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return cubin, log


kCompileFunctions = {"nvcc": compile_nvcc, "nvrtc-ptxas": compile_nvrtc_ptxas,
                     "nvrtc": compile_nvrtc}
