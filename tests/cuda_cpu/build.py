"""Compile CUDA sources for the CPU emulation (see include/espo_emulate.h) into a shared library, cached by content.

``build_library(sources)`` compiles the given .cu/.cpp files with the emulator (``emulate.cpp``) and the fake CUDA
headers (``include/``) under ``g++ -O1 -std=c++17 -ffp-contract=off -fno-fast-math -DESPO_CPU_EMULATION``, into
``$ESPO_CUDA_CPU_CACHE`` (default ``~/.cache/espo-cuda-cpu``)``/<hash>/``, where the hash covers the compiler, the
flags and every source and header; it returns the library's path. It raises ``BuildUnavailable`` where there is no
g++ (tests skip) and ``BuildError`` when the sources do not compile (tests fail: a kernel that no longer builds
under the emulation is a break). ``load_sample_library()`` is the sample op's library (csrc/*.cu with
harness.cpp) as a ctypes CDLL.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
INCLUDE = HERE / "include"
FLAGS = ["-O1", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-DESPO_CPU_EMULATION", "-fPIC", "-shared",
         "-pthread"]
# The sanitized variant: out-of-bounds reads and writes through any pointer, undefined behaviour. Its library needs
# the ASan runtime loaded first (``asan_runtime()`` for LD_PRELOAD), so it runs in a process started for it.
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer")
SANITIZE_ENV = "ESPO_CUDA_CPU_SANITIZE"


class BuildUnavailable(RuntimeError):
    """No compiler here to build the emulated library (the message says what to set)."""


class BuildError(RuntimeError):
    """The sources do not compile (or link) under the emulation; the message holds the command and its errors."""


def compiler() -> str | None:
    return os.environ.get("ESPO_CUDA_CPU_CXX") or shutil.which("g++")


def _cache_root() -> Path:
    if os.environ.get("ESPO_CUDA_CPU_CACHE"):
        return Path(os.environ["ESPO_CUDA_CPU_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "espo-cuda-cpu"


def _key(cxx: str, sources: list[Path], flags: list[str]) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256(version.encode())
    h.update(" ".join(flags).encode())
    headers = sorted(INCLUDE.glob("*.h")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    for path in [*sources, *headers]:
        h.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build_library(sources: list[Path], name: str = "emulated", extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library of ``sources`` (CUDA .cu files compiled as C++, and .cpp files) linked with the emulator."""
    cxx = compiler()
    if cxx is None:
        raise BuildUnavailable("g++ is not on PATH (set ESPO_CUDA_CPU_CXX to a C++17 compiler)")
    sources = [Path(s).resolve() for s in sources] + [HERE / "emulate.cpp"]
    flags = [*FLAGS, *extra_flags]
    out_dir = _cache_root() / _key(cxx, sources, flags)
    lib = out_dir / f"lib{name}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [cxx, *flags, f"-I{INCLUDE}", f"-I{CSRC}"]
    for src in sources:
        cmd += ["-x", "c++" if src.suffix == ".cu" else "none", str(src)]
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so")  # then renamed: a concurrent build never sees half a file
    os.close(fd)
    res = subprocess.run([*cmd, "-x", "none", "-o", tmp], capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"the emulated build failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    os.replace(tmp, lib)
    _prune(out_dir.parent)
    return lib


def _prune(root: Path, keep: int = 12) -> None:
    """Remove all but the newest ``keep`` builds (folders named by a hash holding only lib*.so files)."""
    def is_build(d: Path) -> bool:
        return (d.is_dir() and len(d.name) == 20 and all(c in "0123456789abcdef" for c in d.name)
                and all(f.suffix == ".so" for f in d.iterdir()))

    builds = [d for d in root.iterdir() if is_build(d)]
    for old in sorted(builds, key=lambda d: d.stat().st_mtime, reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def sample_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu")) + [HERE / "harness.cpp"]


def sanitized() -> bool:
    """Whether this process runs the sanitized variant (``ESPO_CUDA_CPU_SANITIZE=1``, ASan runtime preloaded)."""
    return os.environ.get(SANITIZE_ENV) == "1"


def asan_runtime() -> str | None:
    """The path of the compiler's ASan runtime (for LD_PRELOAD), or None without one."""
    cxx = compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@lru_cache(maxsize=None)
def load_sample_library() -> ctypes.CDLL:
    """The sample op's emulated library (built on first use; the sanitized variant under ``ESPO_CUDA_CPU_SANITIZE=1``);
    BuildUnavailable or BuildError when it cannot be had."""
    if sanitized():
        return ctypes.CDLL(str(build_library(sample_sources(), "espo_sample_emulated_asan", SANITIZE_FLAGS)))
    return ctypes.CDLL(str(build_library(sample_sources(), "espo_sample_emulated")))
