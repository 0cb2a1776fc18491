"""The build's choices on a machine with old or missing tools, and the torch-version guard.

The end-to-end proof is CI itself (.ci/run sets up a fresh clone with only the OS's folders on
PATH, then scripts/check_pip_install.sh); these tests pin the choices that make it pass.
"""
import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_setup_module():
    spec = importlib.util.spec_from_file_location("jakiro_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as a script
    return module


def fake_tool(folder: Path, name: str, prints: str, code: int = 0) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{prints}'\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def setup_module(monkeypatch):
    for name in ("JAKIRO_CMAKE", "JAKIRO_NINJA", "JAKIRO_CUDA", "CUDA_HOME", "CUDA_PATH", "CXX"):
        monkeypatch.delenv(name, raising=False)
    return load_setup_module()


def test_the_venv_cmake_and_ninja_are_chosen_when_path_has_only_an_old_cmake(tmp_path):
    """The fresh-machine failure: Debian's cmake 3.25 first on PATH, the venv's bin not on PATH."""
    old = tmp_path / "bin"
    old.mkdir()
    fake_tool(old, "cmake", "cmake version 3.25.1")
    fake_tool(old, "ninja", "1.10.1")
    script = f"""
import importlib.util, sys, torch
from pathlib import Path
spec = importlib.util.spec_from_file_location("s", {str(ROOT / 'setup.py')!r})
s = importlib.util.module_from_spec(spec); spec.loader.exec_module(s)
cmake, version = s.find_cmake()
ninja, _ = s.find_ninja()
configure, build = s.cmake_commands(torch, cmake, ninja, None, Path({str(tmp_path)!r}), Path({str(tmp_path / 'b')!r}))
print(configure[0]); print(build[0]); print(".".join(map(str, version)))
print([a for a in configure if a.startswith("-DCMAKE_MAKE_PROGRAM=")][0])
"""
    env = {"PATH": f"{old}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    configure_cmake, build_cmake, version, make_program = out.stdout.split()
    import cmake as cmake_package

    assert configure_cmake == build_cmake == str(Path(cmake_package.CMAKE_BIN_DIR) / "cmake")
    assert tuple(map(int, version.split(".")[:2])) >= (3, 30)
    assert make_program != f"-DCMAKE_MAKE_PROGRAM={old / 'ninja'}"
    assert Path(make_program.split("=", 1)[1]).is_file()


def test_an_explicit_old_cmake_is_refused_in_one_line(setup_module, tmp_path, monkeypatch):
    monkeypatch.setenv("JAKIRO_CMAKE", str(fake_tool(tmp_path, "cmake", "cmake version 3.25.1")))
    with pytest.raises(SystemExit) as error:
        setup_module.find_cmake()
    message = str(error.value)
    assert message.startswith("jakiro build: error: CMake >= 3.30 is needed") and "\n" not in message
    assert "3.25.1" in message and "pip install 'cmake>=3.30'" in message


def test_a_missing_compiler_says_what_to_install(setup_module, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(SystemExit, match=r"jakiro build: error: no C\+\+ compiler found .*apt-get install g\+\+"):
        setup_module.check_compiler_and_headers()


def test_missing_python_headers_say_what_to_install(setup_module, monkeypatch, tmp_path):
    paths = dict(setup_module.sysconfig.get_paths(), include=str(tmp_path))
    monkeypatch.setattr(setup_module.sysconfig, "get_paths", lambda: paths)
    with pytest.raises(SystemExit, match=r"Python \d+\.\d+ headers are missing .*-dev\)"):
        setup_module.check_compiler_and_headers()


def test_an_nvcc_that_does_not_run_is_skipped_or_refused(setup_module, monkeypatch, tmp_path, capsys):
    (tmp_path / "bin").mkdir()
    fake_tool(tmp_path / "bin", "nvcc", "nvcc: error while loading shared libraries", code=127)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))

    class CudaTorch:
        __version__ = "2.14.1+cu130"

        class version:
            cuda = "13.0"

    assert setup_module.decide_cuda(CudaTorch) is None
    assert "building without CUDA kernels" in capsys.readouterr().out
    monkeypatch.setenv("JAKIRO_CUDA", "1")
    with pytest.raises(SystemExit, match=r"JAKIRO_CUDA=1 but the CUDA kernels cannot be built: .*does not run"):
        setup_module.decide_cuda(CudaTorch)


def test_an_nvcc_that_cannot_compile_is_reported_with_its_last_line(setup_module, tmp_path):
    nvcc = fake_tool(tmp_path, "nvcc", "error -- unsupported GNU version!", code=1)
    assert setup_module.nvcc_compiles(nvcc, tmp_path) == "error -- unsupported GNU version!"


def test_ops_built_against_another_torch_fail_to_import_naming_both_versions():
    script = "import torch; torch.__version__ = '1.0.0+other'; import jakiro"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: jakiro's compiled ops were built against torch ")
    assert f"torch {torch.__version__}" in last and "but torch 1.0.0+other is installed" in last
