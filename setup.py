"""Builds the sokd package and, when torch is importable at build time, the sokd._C extension.

The extension always gets the CPU and device-generic sources (csrc/*.cpp, csrc/composite/*.cpp,
csrc/cpu/*.cpp). It gets the CUDA sources (csrc/cuda/*.cu) when torch is a CUDA build, nvcc is
found and torch sees a GPU; SOKD_CUDA=0 or SOKD_CUDA=1 forces either way (SOKD_CUDA=1 builds
them without a GPU, as CI does to keep every .cu file compiling). The build runs MAX_JOBS compile jobs at once, by
default one per core.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

PACKAGES = ["sokd", "sokd._ops", "sokd.reference", "sokd.integrations", "sokd.kernels"]
PACKAGE_DIR = {"sokd.kernels": "kernels"}
# Without a GPU to detect at build time: the data-centre GPUs we target, plus PTX of the newest
# so that later architectures can JIT-compile the kernels instead of failing to launch them.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _cuda_wanted(torch_cuda_version, cuda_home, gpu_visible):
    forced = os.environ.get("SOKD_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    if forced is not None:
        raise SystemExit(f"SOKD_CUDA must be 0 or 1, got {forced!r}")
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    buildable = bool(torch_cuda_version) and bool(nvcc) and os.path.exists(nvcc)
    if buildable and not gpu_visible:
        # Kernels that cannot run here would take minutes to compile (nvcc, two GPU
        # architectures); SOKD_CUDA=1 asks for them anyway.
        print("sokd: no GPU visible, so the CUDA kernels are not built (SOKD_CUDA=1 builds "
              "them)", file=sys.stderr)
        return False
    return buildable


def _locate_cuda_toolkit():
    """Point CUDA_HOME at the toolkit the nvcc on PATH belongs to, unless the user set it.

    torch guesses the toolkit as the folder above nvcc's folder. When nvcc on PATH is a
    wrapper script living elsewhere, that guess has no libcudart and the link fails; nvcc's
    own dry run names its real top folder."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=120, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    for line in (dry_run.stdout + dry_run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line[len("#$ TOP="):].strip())
            if os.path.isdir(os.path.join(top, "include")):
                os.environ["CUDA_HOME"] = top
            return


def _pip_nvidia_dirs():
    """Include and lib folders of the nvidia/cu* pip packages installed beside torch. A toolkit
    that holds only the compiler lacks library headers such as cusparse.h; these supply them."""
    includes, libs = [], []
    for entry in sys.path:
        for root in sorted(glob.glob(os.path.join(entry, "nvidia", "*"))):
            include, lib = os.path.join(root, "include"), os.path.join(root, "lib")
            if os.path.isdir(include):
                includes.append(include)
            if os.path.isdir(lib):
                libs.append(lib)
    return includes, libs


def _cpu_vector_flags(torch):
    """AVX2 kernels when the build machine has AVX2: at::vec::Vectorized then uses 256-bit
    lanes and the vector exp/log that libtorch exports (Sleef). Other machines get the
    portable build, whose Vectorized falls back to scalar loops."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions():
    _locate_cuda_toolkit()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sokd: torch is not importable at build time; installing without sokd._C "
              "(the reference and Triton backends still work)", file=sys.stderr)
        return [], {}

    cpu_sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/composite/*.cpp") + glob.glob("csrc/cpu/*.cpp")
    )
    if not cpu_sources:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    include_dirs = [os.path.join(here, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"] + _cpu_vector_flags(torch)
    link_flags = ["-fopenmp"]
    library_dirs = []
    extension_type = cpp_extension.CppExtension
    sources = cpu_sources
    macros = []
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]

    # torch's build runs MAX_JOBS compilations at once; use every core unless told otherwise.
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if _cuda_wanted(torch.version.cuda, cpp_extension.CUDA_HOME, torch.cuda.is_available()):
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        if cuda_sources:
            extension_type = cpp_extension.CUDAExtension
            sources = cpu_sources + cuda_sources
            macros.append(("SOKD_WITH_CUDA", None))
            extra_includes, extra_libs = _pip_nvidia_dirs()
            include_dirs += extra_includes
            library_dirs += extra_libs
            if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST

    extension = extension_type(
        name="sokd._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
