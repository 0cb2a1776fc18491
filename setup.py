"""Build script: drives CMake (ninja) to produce the extension module jakiro/_C.

Environment:
  JAKIRO_CUDA=0|1          force the CUDA kernels off / on (on: fail if they cannot be built).
                           Unset: built whenever nvcc is found and torch is a CUDA build.
  TORCH_CUDA_ARCH_LIST     GPU architectures, default "8.0;9.0".
  CUDA_HOME                the CUDA toolkit (default: /usr/local/cuda, then nvcc on PATH).
  MAX_JOBS                 parallel compile jobs (default: ninja's choice).
  JAKIRO_BUILD_TYPE        CMake build type, default Release.
  JAKIRO_CMAKE_ARGS        extra CMake arguments, space-separated.
  JAKIRO_BUILD_DIR         CMake build folder (default: build/cmake-<python>-<torch>).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0"


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(cuda_home) / "bin" / "nvcc"] if cuda_home else []
    # /usr/local/cuda before PATH: a PATH entry may be a wrapper script outside
    # the toolkit, which would hide the toolkit's root from CMake.
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    for nvcc in candidates:
        if nvcc.is_file():
            return nvcc.resolve()
    return None


def decide_cuda(torch):
    """Returns the nvcc path when CUDA kernels are to be built, else None."""
    wanted = os.environ.get("JAKIRO_CUDA", "").strip()
    if wanted not in ("", "0", "1"):
        sys.exit(f"JAKIRO_CUDA must be 0, 1 or unset, not {wanted!r}")
    if wanted == "0":
        return None
    nvcc = find_nvcc()
    missing = []
    if nvcc is None:
        missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if missing:
        if wanted == "1":
            sys.exit("JAKIRO_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
        print("jakiro: building without CUDA kernels: " + "; ".join(missing), file=sys.stderr)
        return None
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch  # a build requirement; imported late so `setup.py --help` works without it

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A persistent build folder inside the checkout keeps rebuilds incremental.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}"
        build_dir = Path(os.environ.get("JAKIRO_BUILD_DIR") or ROOT / "build" / f"cmake-{tag}")
        build_dir.mkdir(parents=True, exist_ok=True)

        nvcc = decide_cuda(torch)
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
        nvidia_dir = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13"
        args = [
            "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('JAKIRO_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={self._pybind11_cmake_dir()}",
            f"-DJAKIRO_OUTPUT_DIR={out_dir}",
            f"-DJAKIRO_TORCH_DIR={Path(torch.__file__).parent}",
            f"-DJAKIRO_TORCH_VERSION={torch.__version__}",
            f"-DJAKIRO_TORCH_HAS_CUDA={'ON' if torch.version.cuda else 'OFF'}",
            f"-DJAKIRO_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DJAKIRO_WITH_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DJAKIRO_CUDA_ARCH_LIST={arch_list if nvcc else ''}",
        ]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={nvcc.parent.parent}"]
            if nvidia_dir.is_dir():
                args.append(f"-DJAKIRO_NVIDIA_PIP_DIR={nvidia_dir}")
        args += os.environ.get("JAKIRO_CMAKE_ARGS", "").split()
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        build = ["cmake", "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)

    @staticmethod
    def _pybind11_cmake_dir():
        import pybind11

        return pybind11.get_cmake_dir()


setup(ext_modules=[CMakeExtension("jakiro._C")], cmdclass={"build_ext": CMakeBuild})
