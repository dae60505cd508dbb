"""The thin Python side of the CUDA backend: validated tensors -> pointers, strides, dtype code, stream -> ``_C``.

One module per op family (:mod:`pllm_kernels.cuda.lora`); launchers ``<op>_cuda`` take the same arguments as the
Triton launchers ``<op>_triton``, and ``supports(device, dtype)`` says whether a call can run (``None``) or why not.
"""

from pllm_kernels.cuda.lora import lora_apply_cuda, lora_expand_cuda, lora_shrink_cuda, supports

__all__ = ["lora_apply_cuda", "lora_expand_cuda", "lora_shrink_cuda", "supports"]
