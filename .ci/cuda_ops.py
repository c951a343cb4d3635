"""Check of a wheel built with CUDA against a CUDA build of torch, on a machine without a GPU.

Every op that csrc/torch_bindings.cpp implements for CUDA has its CUDA kernel registered once
the installed extension is imported, and the build recorded CUDA. Run outside the source tree.
"""

import pathlib
import re
import sys

import torch

import moe_align
import moe_align._build_info as build_info
import moe_align._C  # noqa: F401

bindings = pathlib.Path(sys.argv[1]).read_text()
cuda_block = bindings[bindings.index("TORCH_LIBRARY_IMPL(moe_align, CUDA, m)"):]
cuda_ops = re.findall(r'm\.impl\("(\w+)"', cuda_block[:cuda_block.index("\n}")])
assert cuda_ops, "found no CUDA impl in torch_bindings.cpp"
assert "site-packages" in moe_align.__file__, f"moe_align imported from {moe_align.__file__}"
assert build_info.WITH_CUDA and torch.version.cuda, (build_info.WITH_CUDA, torch.version.cuda)
missing = [op for op in cuda_ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_align::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"CUDA build ok: torch {torch.__version__}, archs {build_info.CUDA_ARCHS}, CUDA kernels of {', '.join(cuda_ops)}")
