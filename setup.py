"""Build script: the Python package plus the optional C++/CUDA extension `fastelectra._C`.

The extension is built from csrc/ as a CUDAExtension when the installed torch has CUDA and nvcc
is found, else as a CppExtension (CPU op only). `FASTELECTRA_SKIP_EXT=1` skips it;
`FASTELECTRA_NO_CUDA=1` forces the CPU-only build. A missing compiler or a failed build is a
warning, not an install failure: fastelectra then tries a JIT build at first use and reports
why the op is unavailable (`fastelectra info`).
"""
import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(msg):
    warnings.warn(msg)
    print(f"fastelectra setup: {msg}", file=sys.stderr)


def extension_build():
    """Return (ext_modules, cmdclass) for fastelectra._C, or ([], {}) with a warning."""
    if os.environ.get("FASTELECTRA_SKIP_EXT") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn("torch is not importable at build time; skipping fastelectra._C "
              "(install torch first and use --no-build-isolation)")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _warn(f"no C++ compiler ({cxx!r}) found; skipping fastelectra._C")
        return [], {}

    use_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                and os.environ.get("FASTELECTRA_NO_CUDA") != "1")
    # -ffp-contract=off: the host noise math must round like the device's (csrc/philox.h); no
    # --use_fast_math for nvcc: it would flush denormals that the CPU op keeps. No -std: torch's
    # build helpers pick the C++ standard its headers need (c++17 or c++20).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastelectra._C",
            sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("FASTELECTRA_WITH_CUDA", None)],
            extra_link_args=["-fopenmp"],
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"], "nvcc": ["-O3"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastelectra._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=cxx_flags + ["-fopenmp"], extra_link_args=["-fopenmp"],
        )

    class TolerantBuildExt(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # a broken toolchain must not block installing the package
                _warn(f"building {extension.name} failed ({e}); the replacement op will be "
                      "JIT-built at first use or fall back to the torch reference")

    return [ext], {"build_ext": TolerantBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
