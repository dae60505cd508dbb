"""The per-row plan resolved from profiles, and ``PersonalBatch``: one typed part per layer, built once per forward.

* :mod:`~pllm_kernels.batch.routing`: LoRA routing metadata (:func:`build_lora_meta`, :class:`LoRAMetaBuffers`,
  :func:`tokens_from_rows`), device-side and sync-free.
* :mod:`~pllm_kernels.batch.plan`: :class:`RowPlan` / :class:`BatchPlan` from user profiles (:func:`resolve_plan`).
* :mod:`~pllm_kernels.batch.personal`: :class:`PersonalBatch`.
* :mod:`~pllm_kernels.batch.context`: :class:`ForwardContext`, the per-call state of a patched model.
"""

from pllm_kernels.batch.context import ForwardContext
from pllm_kernels.batch.personal import PersonalBatch
from pllm_kernels.batch.plan import BatchPlan, RowPlan, resolve_plan
from pllm_kernels.batch.routing import LoRAMeta, LoRAMetaBuffers, build_lora_meta, choose_chunk, tokens_from_rows

__all__ = [
    "BatchPlan",
    "ForwardContext",
    "LoRAMeta",
    "LoRAMetaBuffers",
    "PersonalBatch",
    "RowPlan",
    "build_lora_meta",
    "choose_chunk",
    "resolve_plan",
    "tokens_from_rows",
]
