"""Build script: the pure-Python package plus the C++ extensions from csrc/ (docs/build.md).

`pip install --no-build-isolation -e .` always builds `rklu_fast._C` (op schemas, CPU and Meta kernels), and
`rklu_fast._C_cuda` (CUDA kernels) when torch is a CUDA build and nvcc exists. RKLU_BUILD_CUDA=0 skips it,
RKLU_BUILD_CUDA=1 requires it. The .so files hold no Python module: rklu_fast/cpp_backend.py loads them with
torch.ops.load_library.
"""
import os
import platform

from setuptools import setup

# /usr/local/bin/nvcc may be a wrapper, from which torch would guess CUDA_HOME=/usr/local; and with no GPU to ask,
# torch needs an explicit arch list. Both must be set before cpp_extension is imported.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

CSRC = "csrc"  # sources relative to this file (setuptools wants relative paths); headers found by absolute path
CSRC_ABS = os.path.join(os.path.dirname(os.path.abspath(__file__)), CSRC)
# -g0 overrides the -g from Python's CFLAGS (debug info doubles compile time); -fopenmp: at::parallel_for is
# single-threaded without it.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]
if platform.machine() in ("x86_64", "AMD64"):
    # at::vec picks its implementation from these macros: AVX2 + FMA (cpp_backend checks the CPU before loading).
    CXX_FLAGS += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _want_cuda() -> bool:
    choice = os.environ.get("RKLU_BUILD_CUDA", "").strip()
    possible = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))
    if choice == "0":
        return False
    if choice == "1" and not possible:
        raise RuntimeError(f"RKLU_BUILD_CUDA=1 but torch {torch.__version__} is not a CUDA build or nvcc is missing "
                           f"(CUDA_HOME={CUDA_HOME})")
    return possible


ext_modules = [
    CppExtension(
        "rklu_fast._C",
        [f"{CSRC}/rklu_cpu.cpp"],
        include_dirs=[CSRC_ABS],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )
]
if _want_cuda():
    ext_modules.append(
        CUDAExtension(
            "rklu_fast._C_cuda",
            [f"{CSRC}/rklu_cuda.cu"],
            include_dirs=[CSRC_ABS],
            extra_compile_args={
                "cxx": ["-O3", "-g0"],
                # -Xptxas -v: the register/spill report of every kernel lands in the build log (make install greps it)
                "nvcc": ["-O3", "-Xptxas", "-v", "-lineinfo", "--threads", "2"],
            },
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
