"""Every Triton kernel compiles for sm_90 (H100) with its GPU tiles, without a GPU.

tests/sm90_compile.py runs the ops' Triton launches in compile-only mode (bf16 and float32, one
process each); its docstring says what is checked. The interpreter that runs the other tests
checks none of it: it accepts code the compiler rejects and knows no shared-memory or register
limits."""

import os
import re
import subprocess
import sys

import triton

SCRIPT = os.path.join(os.path.dirname(__file__), "sm90_compile.py")
KERNEL_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "kernels")
# every launchable kernel of kernels/*.py (helpers called from kernels are compiled with them)
KERNELS = sorted(name for file in os.listdir(KERNEL_DIR) if file.endswith(".py")
                 for name in re.findall(r"@triton\.jit\ndef (\w+_kernel)\(",
                                        open(os.path.join(KERNEL_DIR, file)).read()))


def test_triton_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOE_ALIGN_BACKEND")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    assert os.path.exists(os.path.join(bin_dir, "ptxas")) and os.path.exists(os.path.join(bin_dir, "cuobjdump"))
    runs = {dtype: subprocess.Popen([sys.executable, SCRIPT, dtype], env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT) for dtype in ("bf16", "fp32")}
    for dtype, run in runs.items():
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, f"{dtype}:\n{output}"
        for kernel in KERNELS:
            assert f"\n{kernel} " in "\n" + output, f"{dtype}: {kernel} was not compiled:\n{output}"
