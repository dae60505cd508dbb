"""pllm_kernels: fused GPU kernels for serving personalized LLMs, many users per batch.

Light import: the ops and batch metadata load eagerly; the Hugging Face layer (``pllm_kernels.hf``) loads on
first use so ``import pllm_kernels`` never imports transformers.
"""

from __future__ import annotations

from pllm_kernels._version import __version__
from pllm_kernels.batch import LoRAMetaBuffers, PersonalBatch, build_lora_meta  # noqa: E402
from pllm_kernels.ops._backend import backend_table, default_backend, set_default_backend  # noqa: E402
from pllm_kernels.ops.lora import PreparedLoRA, lora_apply, lora_expand, lora_shrink, prepare_lora_apply  # noqa: E402
from pllm_kernels.ops.meta import LoRAMeta  # noqa: E402

__all__ = [
    "LoRAMeta",
    "LoRAMetaBuffers",
    "PersonalBatch",
    "PreparedLoRA",
    "__version__",
    "backend_table",
    "build_lora_meta",
    "capabilities",
    "default_backend",
    "lora_apply",
    "lora_expand",
    "lora_shrink",
    "prepare_lora_apply",
    "set_default_backend",
]


def capabilities() -> dict:
    """What this install can run: CUDA extension status, Triton, torch device."""
    import torch

    from pllm_kernels import _ext
    from pllm_kernels.ops._backend import triton_available

    return {
        "version": __version__,
        "backend": default_backend(),
        "ops": backend_table(),
        "triton": triton_available(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_ext": _ext.capabilities(),
    }
