"""Per-row activation steering in patched HF models (issue "input layer"): a batch mixing users with different
vectors, layers, modes and strengths (one of them with a LoRA adapter too, and unsteered rows) equals each row run
alone through a plain forward hook that applies that row's vectors to the decoder blocks' outputs, on every
architecture, with right and left padding, through the fused steer+RMSNorm path and the hook path; greedy generate
steers every generated token."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from utils import assert_bitwise_equal, assert_close  # noqa: E402

from pllm_kernels.hf import patch_model  # noqa: E402
from pllm_kernels.hf.targets import find_decoder_layers  # noqa: E402
from pllm_kernels.testing import ARCHS, MORE_ARCHS, peft_reference, tiny_model  # noqa: E402

LENGTHS = [6, 4, 6, 3, 5]
USERS = ["s_add", None, "s_multi", "s_lora", "s_same_layer"]
MODE_IDS = {"add": 0, "ablate": 1, "ablate_add": 2, "norm_preserve": 3}


def _entries(hidden: int, g: torch.Generator) -> dict:
    v = lambda: torch.randn(hidden, generator=g)  # noqa: E731
    return {
        "s_add": [(0, v(), 2.0, "add")],
        "s_multi": [(1, v(), 0.5, "ablate_add"), (0, v(), 3.0, "norm_preserve")],
        "s_lora": [(1, v(), -1.5, "add")],
        "s_same_layer": [(1, v(), 1.0, "ablate"), (1, v(), 0.75, "add")],
    }


def _lora_spec(arch):
    if arch == "gpt2":
        return dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    if arch == "phi3":
        return dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"])
    return dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def _apply(x: torch.Tensor, entries) -> torch.Tensor:
    """The spec for one row's entries at one layer, written out in float32 (x: (S, H))."""
    y = x.float()
    for v, s, mode in entries:
        v = v.float()
        u = v / v.norm()
        if mode == "add":
            y = y + s * v
        elif mode == "ablate":
            y = y - (y @ u)[:, None] * u
        elif mode == "ablate_add":
            y = y - (y @ u)[:, None] * u + s * v
        else:
            z = y + s * v
            y = z * (y.norm(dim=-1, keepdim=True) / z.norm(dim=-1, keepdim=True))
    return y.to(x.dtype)


class _Hooks:
    """A plain forward hook per decoder block applying one row's entries to the block output (the reference)."""

    def __init__(self, model, entries):
        _, layers = find_decoder_layers(model)
        self.handles = []
        for i, block in enumerate(layers):
            mine = [(v, s, m) for lyr, v, s, m in entries if lyr == i]
            if mine:
                self.handles.append(block.register_forward_hook(self._hook(mine)))

    @staticmethod
    def _hook(mine):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            new = torch.stack([_apply(h[b], mine) for b in range(h.shape[0])])
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module", params=ARCHS + MORE_ARCHS)
def setup(request):
    arch = request.param
    base = tiny_model(arch, seed=5)
    peft_model, sds = peft_reference(base, {"s_lora": _lora_spec(arch)}, seed=9)
    pm = patch_model(base, num_slots=4, max_rank=8)
    hidden = base.get_input_embeddings().embedding_dim
    entries = _entries(hidden, torch.Generator().manual_seed(11))
    pm.register_user("s_lora", *sds["s_lora"])
    for user, es in entries.items():
        for layer, v, s, mode in es:
            pm.add_steering(user, layer, v, scale=s, mode=mode)
    yield arch, base, pm, peft_model, entries
    pm.unpatch()


def _batch(lengths, vocab, side, seed=3):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    rows = []
    for b, n in enumerate(lengths):
        row = torch.randint(3, vocab, (n,), generator=g)
        rows.append(row)
        sl = slice(S - n, S) if side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = row, 1
    return ids, mask, rows


def _alone(arch, base, pm, peft_model, entries, user, row):
    """Logits of one row alone (no padding): the base / PEFT model with reference hooks, our layers silent."""
    model = peft_model if user == "s_lora" else base
    kw = dict(adapter_names=["s_lora"]) if user == "s_lora" else {}
    hooks = _Hooks(model, entries.get(user, []))
    try:
        with pm.users(None):  # our steering points and LoRA stay silent: the reference is the plain model
            return model(input_ids=row[None], **kw).logits[0]
    finally:
        hooks.remove()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_batch_equals_rows_alone(setup, side, fused):
    arch, base, pm, peft_model, entries = setup
    ids, mask, rows = _batch(LENGTHS, base.config.vocab_size, side)
    ctx = torch.no_grad() if fused else torch.enable_grad()  # grad enabled: the fused path steps aside
    with ctx:
        out = pm(ids, attention_mask=mask, users=USERS).logits.detach()
        plain = pm(ids, attention_mask=mask, users=[None] * len(USERS)).logits.detach()
    with torch.no_grad():
        for b, (user, row) in enumerate(zip(USERS, rows)):
            S, n = ids.shape[1], len(row)
            cols = slice(S - n, S) if side == "left" else slice(0, n)
            want = _alone(arch, base, pm, peft_model, entries, user, row)
            if user is not None:
                assert (want - plain[b, cols]).abs().max() > 1e-3, f"{user}: steering must matter"
            assert_close(out[b, cols], want, torch.float32, scale=float(want.abs().max()), msg=f"{arch} {user}")
    # the unsteered row: bitwise the unsteered batch (the torch backend's fused norm is HF's norm, op for op)
    assert_bitwise_equal(out[1], plain[1], msg=f"{arch}: unsteered row")


@torch.no_grad()
def test_greedy_generate_steers_every_token(setup):
    arch, base, pm, peft_model, entries = setup
    ids, mask, rows = _batch(LENGTHS, base.config.vocab_size, "left", seed=4)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ours = pm.generate(ids, attention_mask=mask, users=USERS, **kw)
    for b, (user, row) in enumerate(zip(USERS, rows)):
        model = peft_model if user == "s_lora" else base
        extra = dict(adapter_names=["s_lora"]) if user == "s_lora" else {}
        hooks = _Hooks(model, entries.get(user, []))
        try:
            with pm.users(None):
                want = model.generate(input_ids=row[None], **kw, **extra)[0, len(row):]
        finally:
            hooks.remove()
        assert torch.equal(ours[b, ids.shape[1]:], want), f"{arch} {user}: {ours[b].tolist()} vs {want.tolist()}"


@torch.no_grad()
def test_fused_path_is_taken_where_the_norm_allows(setup, monkeypatch):
    """Without autograd, a steered layer costs one fused steer+RMSNorm call (no separate steer_add) on the RMSNorm
    architectures; GPT-2's LayerNorm keeps the hook."""
    import pllm_kernels.modules.steering as st

    arch, base, pm, _, _ = setup
    calls = {"steer_add": 0, "steer_rmsnorm": 0}
    for name in calls:
        real = getattr(st, name)
        monkeypatch.setattr(st, name, lambda *a, _r=real, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or
                            _r(*a, **k))
    ids, mask, _ = _batch(LENGTHS, base.config.vocab_size, "left")
    pm(ids, attention_mask=mask, users=USERS)
    steered_layers = 2  # layers 0 and 1 carry vectors
    if arch in ("gpt2", "olmo", "olmo2"):  # LayerNorm / post-norm blocks: no pre-norm reads the block output
        assert calls == {"steer_add": steered_layers, "steer_rmsnorm": 0}
    else:
        assert calls == {"steer_add": 0, "steer_rmsnorm": steered_layers}
