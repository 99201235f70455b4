"""Builds spotserve._C (and the context daemon) with CMake against the installed torch.

Environment:
  SPOTSERVE_CUDA=0|1  force the CUDA sources off/on (default: on when torch has CUDA and nvcc exists)
  MAX_JOBS            parallel compile jobs
  CMAKE_ARGS          extra arguments passed to the CMake configure step
  SPOTSERVE_BUILD_TYPE  Release (default) or Debug
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _want_cuda() -> bool:
    """CUDA build when torch has CUDA and nvcc is found; SPOTSERVE_CUDA overrides."""
    flag = os.environ.get("SPOTSERVE_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"SPOTSERVE_CUDA must be 0 or 1, got {flag!r}")
        return flag == "1"
    import torch

    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc").exists()
    return torch.version.cuda is not None and bool(nvcc)


class CMakeBuild(build_ext):
    def get_outputs(self) -> list[str]:
        # The context daemon executable is built beside _C; list it so editable installs and
        # wheels carry it.
        outs = super().get_outputs()
        daemon = Path(self.get_ext_fullpath("spotserve._C")).parent / "bin" / "spotserve-daemon"
        return outs + [str(daemon)] if daemon.exists() else outs

    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DSPOTSERVE_BIN_DIR={out_dir / 'bin'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SPOTSERVE_BUILD_TYPE', 'Release')}",
            f"-DSPOTSERVE_CUDA={'ON' if cuda else 'OFF'}",
            "-G", "Ninja",
        ]
        if cuda:
            # sm_75 (T4), sm_80 (A100), sm_90 (H100/H200) unless the environment narrows it.
            archs = os.environ.get("CMAKE_CUDA_ARCHITECTURES", "75;80;90")
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={archs}")
        args += os.environ.get("CMAKE_ARGS", "").split()
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        print(f"spotserve: building _C with CUDA={'on' if cuda else 'off'}", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("spotserve._C")], cmdclass={"build_ext": CMakeBuild})
