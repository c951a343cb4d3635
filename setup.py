"""Build of moe_align: setup.py drives the one CMake description of the native extension.

vLLM's CMakeExtension / cmake_build_ext pattern, trimmed. CUDA kernels are built when torch
has CUDA and nvcc is found (``MOE_ALIGN_BUILD_CUDA=0/1`` overrides), decided here at build time,
never by whether a GPU is present. ``TORCH_CUDA_ARCH_LIST`` picks the architectures (9.0 by
default). Install with ``pip install --no-build-isolation -e .`` so the extension is built
against the torch that will run it.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _cuda_archs() -> tuple[str, str]:
    """(TORCH_CUDA_ARCH_LIST as given, the same as CMAKE_CUDA_ARCHITECTURES)."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").strip() or "9.0"
    cmake_archs = []
    for arch in re.split(r"[;\s]+", arch_list):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if not match:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read architecture {arch!r}")
        major, minor, suffix, ptx = match.groups()
        cmake_archs.append(f"{major}{minor}{suffix}" + ("" if ptx else "-real"))
    return arch_list, ";".join(cmake_archs)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class cmake_build_ext(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import torch

        override = os.environ.get("MOE_ALIGN_BUILD_CUDA")
        if override is not None and override not in ("0", "1"):
            raise ValueError(f"MOE_ALIGN_BUILD_CUDA must be 0 or 1, got {override!r}")
        nvcc = _nvcc()
        if override is None:
            with_cuda = torch.version.cuda is not None and nvcc is not None
        else:
            with_cuda = override == "1"
            if with_cuda and (torch.version.cuda is None or nvcc is None):
                raise RuntimeError(
                    "MOE_ALIGN_BUILD_CUDA=1 needs a CUDA build of torch and nvcc; found torch "
                    f"{torch.__version__} (CUDA {torch.version.cuda}) and nvcc at {nvcc}"
                )
        arch_list, cmake_archs = _cuda_archs() if with_cuda else ("", "")

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_path.parent}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMOE_ALIGN_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        env = dict(os.environ)
        if with_cuda:
            cmake_args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cmake_archs}",
                # torch's CMake would otherwise infer the toolkit from a wrapper such as
                # /usr/local/bin/nvcc and look for CUDA under /usr/local.
                f"-DCUDA_TOOLKIT_ROOT_DIR={Path(nvcc).resolve().parent.parent}",
            ]
            env["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's own CMake files too
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", str(ROOT), *cmake_args], cwd=build_temp, env=env)
        subprocess.check_call(
            ["cmake", "--build", ".", "--config", config, "-j", jobs], cwd=build_temp, env=env
        )

        # What was built, for the error message of a failed `import moe_align._C`. An editable
        # install imports the package from the source tree, so the record goes there as well.
        record = (
            '"""Written by setup.py at build time."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
            f"CUDA_ARCHS = {arch_list!r}\n"
            f"WITH_CUDA = {with_cuda!r}\n"
        )
        targets = {ext_path.parent}
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(ROOT / "moe_align")
        for target in targets:
            (target / "_build_info.py").write_text(record)


setup(
    packages=["moe_align", "moe_align.ops", "moe_align.modules", "moe_align.models", "moe_align.kernels",
              "moe_align.train", "moe_align.integrations"],
    package_dir={"moe_align.kernels": "kernels"},
    ext_modules=[CMakeExtension("moe_align._C")],
    cmdclass={"build_ext": cmake_build_ext},
)
