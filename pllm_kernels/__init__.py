"""pllm_kernels: fused GPU kernels for serving personalized LLMs, many users per batch.

Light import: the ops and batch metadata load eagerly; the Hugging Face layer (``pllm_kernels.hf``) loads on
first use so ``import pllm_kernels`` never imports transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pllm_kernels.batch import LoRAMetaBuffers, PersonalBatch, build_lora_meta  # noqa: E402
from pllm_kernels.ops.lora import lora_apply, lora_expand, lora_shrink  # noqa: E402
from pllm_kernels.ops.meta import LoRAMeta  # noqa: E402

__all__ = [
    "LoRAMeta",
    "LoRAMetaBuffers",
    "PersonalBatch",
    "build_lora_meta",
    "lora_apply",
    "lora_expand",
    "lora_shrink",
    "capabilities",
]


def capabilities() -> dict:
    """What this install can run: CUDA extension status, Triton, torch device."""
    import torch

    from pllm_kernels import _ext
    from pllm_kernels.ops._backend import requested_backend, triton_available

    return {
        "version": __version__,
        "backend": requested_backend(),
        "triton": triton_available(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_ext": _ext.capabilities(),
    }
