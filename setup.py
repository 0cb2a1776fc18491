"""Build script: drives CMake (with ninja) to produce the extension module jakiro/_C.

Environment read by the build:
  JAKIRO_CUDA=0|1          force the CUDA kernels off / on (on: fail if they cannot be built).
                           Unset: built whenever a working nvcc is found and torch is a CUDA build.
  TORCH_CUDA_ARCH_LIST     GPU architectures, default "8.0;9.0".
  CUDA_HOME (CUDA_PATH)    the CUDA toolkit (default: /usr/local/cuda, then nvcc on PATH).
  JAKIRO_CMAKE, JAKIRO_NINJA
                           the cmake / ninja executables to use. Default: those of the Python
                           environment that builds (the `cmake` and `ninja` packages, which
                           scripts/setup.sh and pip's build isolation install), then PATH;
                           cmake must be >= 3.30.
  CXX                      the C++ compiler (default: CMake's choice, c++ on PATH).
  MAX_JOBS                 parallel compile jobs (default: ninja's choice).
  JAKIRO_BUILD_TYPE        CMake build type, default Release.
  JAKIRO_CMAKE_ARGS        extra CMake arguments, space-separated.
  JAKIRO_BUILD_DIR         CMake build folder (default: build/cmake-<python>-<torch>).

Every missing prerequisite ends the build with one line starting "jakiro build: error:" that
says what to install.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0"
MIN_CMAKE = (3, 30)
BUILT_WITH = "_built_with.py"
BUILD_TOOLS_HINT = "pip install 'cmake>=3.30' ninja 'pybind11>=2.12' into this Python environment"


def fail(message: str):
    """Ends the build with one line that says what to do (no CMake trace)."""
    sys.exit(f"jakiro build: error: {message}")


def say(message: str):
    print(f"jakiro build: {message}", flush=True)


def tool_version(executable) -> tuple[int, ...] | None:
    """The x.y.z a tool prints for --version, or None if it does not run."""
    try:
        out = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # x.y.z first (nvcc prints "release 13.0, V13.0.88"), else x.y
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out) or re.search(r"(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else None


def _package_bin(module: str, attribute: str, name: str) -> list[Path]:
    """The executable of a PyPI tool package (cmake, ninja) importable by the building interpreter:
    in the package's own data folder, or in the ``bin`` folder of the environment the package is
    installed in (which need not be the interpreter's own, nor on PATH)."""
    try:
        package = __import__(module)
    except ImportError:
        return []
    found = [Path(getattr(package, attribute)) / name] if hasattr(package, attribute) else []
    site_packages = Path(package.__file__).resolve().parent.parent       # <env>/lib/pythonX.Y/site-packages
    return found + [folder / "bin" / name for folder in site_packages.parents[:3]]


def _candidates(name: str, env: str, module: str, attribute: str) -> list[Path]:
    """Where to look for a build tool, best first: an explicit override, the building Python
    environment (where setup.sh and pip's build isolation install the pinned tools, whether or
    not its bin folder is on PATH), then PATH."""
    if os.environ.get(env):
        return [Path(os.environ[env])]
    found = _package_bin(module, attribute, name)
    found += [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    on_path = shutil.which(name)
    if on_path:
        found.append(Path(on_path))
    unique = []
    for path in found:
        if path.is_file() and os.access(path, os.X_OK) and path not in unique:
            unique.append(path)
    return unique


def find_cmake() -> tuple[Path, tuple[int, ...]]:
    seen = []
    for cmake in _candidates("cmake", "JAKIRO_CMAKE", "cmake", "CMAKE_BIN_DIR"):
        version = tool_version(cmake)
        if version and version[:2] >= MIN_CMAKE:
            return cmake, version
        seen.append(f"{cmake} ({'.'.join(map(str, version)) if version else 'does not run'})")
    found = f"found only {', '.join(seen)}" if seen else "none found"
    fail(f"CMake >= {'.'.join(map(str, MIN_CMAKE))} is needed ({found}): {BUILD_TOOLS_HINT}, "
         f"or set JAKIRO_CMAKE to a newer cmake")


def find_ninja() -> tuple[Path, tuple[int, ...]]:
    for ninja in _candidates("ninja", "JAKIRO_NINJA", "ninja", "BIN_DIR"):
        version = tool_version(ninja)
        if version:
            return ninja, version
    fail(f"ninja is needed and none runs: {BUILD_TOOLS_HINT}, or set JAKIRO_NINJA")


def check_compiler_and_headers():
    """The two prerequisites CMake would otherwise report as a long trace."""
    cxx = os.environ.get("CXX")
    compiler = shutil.which(cxx) if cxx else next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    if compiler is None:
        fail(f"no C++ compiler found ({'CXX=' + cxx + ' is not runnable' if cxx else 'no c++, g++ or clang++ on PATH'}): "
             "install one (Debian/Ubuntu: apt-get install g++) or set CXX")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        fail(f"the Python {version} headers are missing ({include}/Python.h): install them "
             f"(Debian/Ubuntu: apt-get install python{version}-dev)")
    return compiler


def pybind11_cmake_dir() -> str:
    try:
        import pybind11
    except ImportError:
        fail(f"pybind11 is not installed: {BUILD_TOOLS_HINT}")
    return pybind11.get_cmake_dir()


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
        fail(f"JAKIRO_CUDA must be 0, 1 or unset, not {wanted!r}")
    if wanted == "0":
        return None
    nvcc = find_nvcc()
    missing = []
    if nvcc is None:
        missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    elif tool_version(nvcc) is None:
        missing.append(f"{nvcc} does not run (`{nvcc} --version` fails): repair the CUDA toolkit or set CUDA_HOME")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if missing:
        if wanted == "1":
            fail("JAKIRO_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
        say("building without CUDA kernels: " + "; ".join(missing) + " (JAKIRO_CUDA=0 silences this)")
        return None
    return nvcc


def nvcc_compiles(nvcc: Path, scratch: Path) -> str | None:
    """None when nvcc compiles a trivial kernel with the host compiler CMake will use, else why not."""
    source = scratch / "nvcc_probe.cu"
    source.write_text("__global__ void probe(int* x) { *x = 1; }\n")
    command = [str(nvcc), "-c", str(source), "-o", str(scratch / "nvcc_probe.o")]
    if os.environ.get("CXX"):
        command += ["-ccbin", os.environ["CXX"]]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if result.returncode == 0:
        return None
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"


def cmake_commands(torch, cmake: Path, ninja: Path, nvcc: Path | None, out_dir: Path, build_dir: Path):
    """The configure and compile command lines, with the chosen cmake and ninja spelled out."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    nvidia_dir = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13"
    args = [
        "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}",
        f"-DCMAKE_BUILD_TYPE={os.environ.get('JAKIRO_BUILD_TYPE', 'Release')}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11_cmake_dir()}",
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
    build = [str(cmake), "--build", str(build_dir)]
    if os.environ.get("MAX_JOBS"):
        build += ["--parallel", os.environ["MAX_JOBS"]]
    return [str(cmake), "-S", str(ROOT), "-B", str(build_dir), *args], build


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch  # a build requirement; imported late so `setup.py --help` works without it

        compiler = check_compiler_and_headers()
        cmake, cmake_version = find_cmake()
        ninja, ninja_version = find_ninja()
        say(f"cmake {'.'.join(map(str, cmake_version))} ({cmake}), ninja {'.'.join(map(str, ninja_version))} "
            f"({ninja}), C++ compiler {compiler}, torch {torch.__version__}")

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A persistent build folder inside the checkout keeps rebuilds incremental.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}"
        build_dir = Path(os.environ.get("JAKIRO_BUILD_DIR") or ROOT / "build" / f"cmake-{tag}")
        build_dir.mkdir(parents=True, exist_ok=True)

        nvcc = decide_cuda(torch)
        if nvcc:
            broken = nvcc_compiles(nvcc, build_dir)
            if broken and os.environ.get("JAKIRO_CUDA") == "1":
                fail(f"JAKIRO_CUDA=1 but {nvcc} cannot compile a CUDA file: {broken}")
            if broken:
                say(f"building without CUDA kernels: {nvcc} cannot compile a CUDA file ({broken}); "
                    "JAKIRO_CUDA=0 silences this")
                nvcc = None
        if nvcc:
            say(f"CUDA kernels: nvcc {'.'.join(map(str, tool_version(nvcc)))} ({nvcc})")
        configure, build = cmake_commands(torch, cmake, ninja, nvcc, out_dir, build_dir)
        for step, command in (("configure", configure), ("compile", build)):
            if subprocess.run(command).returncode != 0:
                fail(f"CMake {step} step failed (its output is above; build folder {build_dir})")
        # For the import-time check that the installed torch is the one these objects were built
        # against (another torch's ABI would crash instead of failing cleanly).
        (out_dir / BUILT_WITH).write_text(
            '"""Written by setup.py: the torch the compiled ops were built against."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n")

    def copy_extensions_to_source(self):
        """Editable installs: the torch-version record goes to the source tree with the module."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(str(Path(regular_file).parent / BUILT_WITH), str(Path(inplace_file).parent / BUILT_WITH))


if __name__ == "__main__":
    setup(ext_modules=[CMakeExtension("jakiro._C")], cmdclass={"build_ext": CMakeBuild})
