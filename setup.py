"""Build script: the pure-Python package, plus the CUDA extension espo._C where it can be built.

The extension (csrc/*.cu kernels and csrc/bindings.cpp, registering torch.ops.espo.*) is built when the
build can import a CUDA build of torch and find the CUDA toolkit (nvcc): install with

    pip install --no-build-isolation .        # so that the build sees the torch you run with

GPU architectures come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). Otherwise the package installs
without it, saying why in one line, and espo.backends() reports the "cuda" backend as unavailable.
Packages and their directories are declared in pyproject.toml ([tool.setuptools]); this file only adds
the extension.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def _notice(reason):
    print(f"espo-rl: building without the CUDA extension espo._C ({reason}); the 'cuda' backend will be unavailable",
          file=sys.stderr)


def _cuda_extension():
    """(ext_modules, cmdclass) for espo._C, or None and a reason."""
    if os.environ.get("ESPO_NO_CUDA_EXT", "0") not in ("", "0"):
        return None, "ESPO_NO_CUDA_EXT is set"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        return None, f"torch is not importable at build time ({err}); use pip install --no-build-isolation ."
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cu")))
    sources.append(os.path.join("csrc", "bindings.cpp"))
    ext = cpp_extension.CUDAExtension(
        name="espo._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return ([ext], {"build_ext": cpp_extension.BuildExtension}), ""


built, reason = _cuda_extension()
if built is None:
    _notice(reason)
    setup()
else:
    ext_modules, cmdclass = built
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
