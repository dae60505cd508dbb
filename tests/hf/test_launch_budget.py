"""Launch budget of the LoRA path at decode: at most 6 kernel launches per decoder layer for all seven Llama
targets (q, k, v, o, gate, up, down), counting memsets, copies and adds (issue "Decode at serving speed").

Counted on CPU: a decode step of a tiny patched Llama runs the Triton backend under the interpreter; every Triton
kernel launch counts one (whatever the interpreter does inside it is not counted), and every aten op that would
launch a kernel on a GPU (everything but views, allocations and metadata) counts one. The LoRA path's count is
the patched model's count inside each decoder layer minus the same model's count for the same step with every row
without a user (the base layers run identically in both)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.testing import left_padded_batch, peft_reference, tiny_model  # noqa: E402

LAUNCH_BUDGET = 6  # per decoder layer per decode step, all seven Llama targets

# aten ops that launch no kernel on a GPU: views, metadata, allocations without a fill
_NO_LAUNCH = {
    "view", "_unsafe_view", "as_strided", "slice", "select", "t", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "detach", "alias", "empty", "empty_strided", "new_empty", "new_empty_strided", "_reshape_alias",
    "split", "split_with_sizes", "unbind", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "size", "stride",
    "is_same_size", "_has_compatible_shallow_copy_type", "resolve_conj", "resolve_neg", "unflatten", "view_as",
    "expand_as", "numpy_T", "contiguous", "reshape", "flatten", "narrow",
}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.on = False
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            name = func.__name__.split(".")[0]
            if name not in _NO_LAUNCH:
                self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _count_decode_step(pm, ids, mask, users, cache, nxt):
    """Per decoder layer: (aten launches, Triton launches) of one decode step."""
    from triton.runtime.interpreter import InterpretedFunction

    layers = pm.model.model.layers
    counter = _Counter()
    triton_launches = Counter()
    current = {"layer": None}
    per_layer = {i: Counter() for i in range(len(layers))}
    hooks = []
    for i, layer in enumerate(layers):
        def pre(mod, args, i=i):
            current["layer"] = i
            counter.ops = per_layer[i]
            counter.on = True

        def post(mod, args, out):
            counter.on = False
            current["layer"] = None

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    orig_run = InterpretedFunction.run

    def run(self, *args, **kwargs):  # one launch; the interpreter's own tensor work is not a GPU launch
        was = counter.on
        counter.on = False
        try:
            if current["layer"] is not None:
                triton_launches[current["layer"]] += 1
            return orig_run(self, *args, **kwargs)
        finally:
            counter.on = was

    InterpretedFunction.run = run
    try:
        with torch.inference_mode(), counter:
            m = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            pm(nxt, attention_mask=m, users=users, past_key_values=cache, use_cache=True)
    finally:
        InterpretedFunction.run = orig_run
        for h in hooks:
            h.remove()
    return [(per_layer[i], triton_launches[i]) for i in range(len(layers))]


@pytest.mark.interpreter
@pytest.mark.parametrize("rows", [4, 24], ids=["fused-everywhere", "groups-bgmv"])
def test_lora_launches_per_decoder_layer_at_decode(rows):
    """4 rows: every call takes the fused kernel (4 launches); 24 rows: the q/k/v and gate/up groups take BGMV
    shrink + one expand into their members' outputs (2 each), o_proj and down_proj the fused kernel (1 each)."""
    torch.manual_seed(0)
    base = tiny_model("llama", seed=5, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    specs = {f"u{i}": dict(r=4 if i % 2 else 8, lora_alpha=8, target_modules="all-linear") for i in range(4)}
    _, sds = peft_reference(base, specs, seed=1)
    pm = patch_model(base, num_slots=4, max_rank=8, backend="triton")
    try:
        for u, (sd, cfg) in sds.items():
            pm.register_user(u, sd, cfg)
        users = [f"u{i % 4}" for i in range(rows)]
        ids, mask = left_padded_batch([5 - i % 3 for i in range(rows)], base.config.vocab_size, seed=2)
        with torch.inference_mode():
            out = pm(ids, attention_mask=mask, users=users, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seen = {}
        for who in ("users", "nobody"):
            rows = users if who == "users" else [None] * len(users)
            seen[who] = _count_decode_step(pm, ids, mask, rows, cache, nxt)
            cache.crop(-1)
        for i, ((ops_u, tri_u), (ops_n, tri_n)) in enumerate(zip(seen["users"], seen["nobody"])):
            assert tri_n == 0
            extra = ops_u - ops_n  # Counter difference: ops the LoRA path added
            missing = ops_n - ops_u
            assert not missing, f"layer {i}: the base path lost ops {dict(missing)}"
            total = sum(extra.values()) + tri_u
            detail = f"layer {i}: {tri_u} Triton launches + aten {dict(extra)}"
            assert tri_u >= 1, detail  # the LoRA path ran
            assert total <= LAUNCH_BUDGET, f"{total} launches > budget {LAUNCH_BUDGET}: {detail}"
            print(f"{total} launches ({detail})")
    finally:
        pm.unpatch()


def test_budget_counter_counts_launches():
    """The counter itself: an add and a fill count, views do not."""
    c = _Counter()
    with c:
        c.on = True
        x = torch.zeros(4, 4)
        y = x.view(16)
        y.add_(1)
        x[0].transpose(0, 0)
    assert c.ops["add_"] == 1 and c.ops["zeros"] + c.ops["fill_"] + c.ops["zero_"] >= 1
    assert "view" not in c.ops and "select" not in c.ops

