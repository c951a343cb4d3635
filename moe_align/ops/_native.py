"""Loading the native extension ``moe_align._C``, which registers the ``torch.ops.moe_align`` ops."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_native() -> None:
    """Import ``moe_align._C``; a failure names torch, CUDA and the build, never falls back silently."""
    try:
        from moe_align import _C  # noqa: F401  (importing registers the ops)
    except ImportError as err:
        try:
            from moe_align import _build_info as info

            built = (
                f"it was built against torch {info.TORCH_VERSION}, "
                f"CUDA {info.CUDA_VERSION or 'none'} (archs: {info.CUDA_ARCHS or 'none'})"
            )
        except ImportError:
            built = "no build record was found (was the package built?)"
        raise ImportError(
            f"moe_align: cannot load the native extension moe_align._C ({err}). "
            f"Running torch {torch.__version__} with CUDA {torch.version.cuda or 'none'}; {built}. "
            "Rebuild with `pip install --no-build-isolation -e .` against the torch you run."
        ) from err


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    load_native()
    from moe_align import _build_info as info

    return bool(info.WITH_CUDA)
