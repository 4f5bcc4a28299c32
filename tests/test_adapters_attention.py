"""MemoryAttention against a reference written with plain softmax on concatenated logits.

The reference below shares no code with kvmem.adapters: it rotates with
complex numbers, expands heads with repeat_interleave, ranks memory with
torch.topk over every stored key, and takes one softmax over the
concatenation [memory logits | causal local logits] (or two softmaxes mixed
by sigmoid(gate)).
"""

from __future__ import annotations

import pytest
import torch
from kvmem.adapters import MemoryAttention, RotaryEmbedding, memory_attention

import kvmem
from kvmem.errors import InvalidInputError

B, H, HKV, D = 2, 4, 2, 16
G = H // HKV


def rope_ref(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE as a complex product: (x_i + i x_{i+d/2}) * exp(i p theta_i)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angle = positions.to(torch.float64).unsqueeze(-1) * theta  # (T, d/2)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference(q, k, v, mem_k, mem_v, mem_q, top, scaling, gate=None):
    """q (B,H,T,d) / k, v (B,Hkv,Tl,d) local; mem_k, mem_v (B,Hkv,N,d) stored; mem_q (B,H,T,d)."""
    T, Tl = q.shape[2], k.shape[2]
    k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, H, Tl, d)
    local = q @ k_rep.transpose(-1, -2) * scaling
    causal = torch.ones(T, Tl, dtype=torch.bool).tril(Tl - T)
    local = local.masked_fill(~causal, float("-inf"))
    N = mem_k.shape[2]
    if N == 0 or top == 0:
        mem = torch.full((*q.shape[:3], 0), float("-inf"))
        mv = torch.zeros(*q.shape[:2], 0, v.shape[-1])
    else:
        mk, mv = mem_k.repeat_interleave(G, 1), mem_v.repeat_interleave(G, 1)  # (B, H, N, d)
        mem = mem_q @ mk.transpose(-1, -2) * scaling  # (B, H, T, N)
        if top < N:
            kth = mem.topk(top, dim=-1).values[..., -1:]
            mem = mem.masked_fill(mem < kth, float("-inf"))
    if gate is None:
        w = torch.softmax(torch.cat([mem, local], -1), -1)
        return w[..., :N] @ mv + w[..., N:] @ v_rep if N else w @ v_rep
    g = torch.sigmoid(gate).view(1, -1, 1, 1)
    mem_out = torch.softmax(mem, -1) @ mv if N and top else 0.0
    return g * mem_out + (1 - g) * (torch.softmax(local, -1) @ v_rep)


def make_store(dtype=torch.float32, dim=D):
    return kvmem.create("exact", dim=dim, value_dim=dim, partitions=B * HKV, dtype=dtype)


def chunks(seed, lengths, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for T in lengths:
        q = torch.randn(B, H, T, D, generator=gen)
        k = torch.randn(B, HKV, T, D, generator=gen)
        v = torch.randn(B, HKV, T, D, generator=gen)
        out.append((q.to(dtype), k.to(dtype), v.to(dtype)))
    return out


def run_modes(mode, gate, top, lengths=(6, 5, 7)):
    """Feed chunks through MemoryAttention and through the reference; return max error."""
    store = make_store()
    layer = MemoryAttention(store, num_heads=H, k=top, positions=mode, gate=gate, rope=RotaryEmbedding(D))
    if gate:
        with torch.no_grad():
            layer.gate.copy_(torch.linspace(-1.5, 2.0, H))
    mem_k = torch.zeros(B, HKV, 0, D)
    mem_v = torch.zeros(B, HKV, 0, D)
    start, worst = 0, 0.0
    for q, k, v in chunks(0, lengths):
        T = q.shape[2]
        pos = torch.arange(start, start + T) if mode == "absolute" else torch.arange(T)
        out = layer(q, k, v, position_ids=pos)
        q_rot, k_rot = rope_ref(q, pos), rope_ref(k, pos)
        mem_q = {"absolute": q_rot, "first": q_rot, "none": q}[mode]
        ref = reference(q_rot, k_rot, v, mem_k, mem_v, mem_q, top, D**-0.5, layer.gate)
        worst = max(worst, (out - ref).abs().max().item())
        stored = {"absolute": k_rot, "first": k, "none": k}[mode]  # "first": rotation at 0 is identity
        mem_k, mem_v = torch.cat([mem_k, stored], 2), torch.cat([mem_v, v], 2)
        start += T
    assert len(store) == B * HKV * start
    return worst


@pytest.mark.parametrize("mode", ["absolute", "first", "none"])
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("top", [4, 64])
def test_matches_reference(mode, gate, top):
    assert run_modes(mode, gate, top) < 1e-5


def test_absolute_with_all_memory_is_full_attention():
    """Chunked memory attention over everything seen == one causal attention over the stream."""
    store = make_store()
    layer = MemoryAttention(store, num_heads=H, k=1000, positions="absolute", rope=RotaryEmbedding(D))
    parts = chunks(1, (5, 8, 3))
    outs, start = [], 0
    for q, k, v in parts:
        outs.append(layer(q, k, v, position_ids=torch.arange(start, start + q.shape[2])))
        start += q.shape[2]
    q, k, v = (torch.cat(t, 2) for t in zip(*parts))
    pos = torch.arange(start)
    full = torch.nn.functional.scaled_dot_product_attention(
        rope_ref(q, pos), rope_ref(k, pos).repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True
    )
    assert (torch.cat(outs, 2) - full).abs().max().item() < 1e-5


def test_query_heads_search_their_kv_partition():
    """Memory of kv head 0 is huge and aligned with every query: only heads 0..G-1 may see it."""
    store = make_store()
    keys = torch.zeros(B * HKV, 1, D)
    keys[0::HKV, 0, 0] = 50.0  # kv head 0 of each batch element
    values = torch.zeros(B * HKV, 1, D)
    values[0::HKV] = 7.0
    store.add(keys, values)
    q = torch.zeros(B, H, 2, D)
    q[..., 0] = 1.0
    k = torch.zeros(B, HKV, 2, D)
    v = torch.zeros(B, HKV, 2, D)
    out = memory_attention(q, k, v, store, 1, write=False)
    assert torch.allclose(out[:, :G], torch.full_like(out[:, :G], 7.0), atol=1e-4)
    assert out[:, G:].abs().max().item() < 1e-6  # kv head 1's memory holds a zero key and value


def test_gradients_reach_queries_and_local_keys_values():
    store = make_store()
    rope = RotaryEmbedding(D)
    layer = MemoryAttention(store, num_heads=H, k=3, positions="first", gate=True, rope=rope)
    (q0, k0, v0), (q1, k1, v1) = chunks(2, (6, 4))
    layer(q0, k0, v0)
    q1, k1, v1 = (t.clone().requires_grad_() for t in (q1, k1, v1))
    out = layer(q1, k1, v1)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (q1, k1, v1, layer.gate))
    # Same gradients through the reference, which treats memory as constants.
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q1, k1, v1))
    pos = torch.arange(4)
    ref = reference(rope_ref(qa, pos), rope_ref(ka, pos), va, k0, v0, rope_ref(qa, pos), 3, D**-0.5,
                    layer.gate)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (qa, ka, va, layer.gate))
    for got, want in zip(grads, ref_grads):
        assert got is not None and got.abs().max() > 0
        assert torch.allclose(got, want, atol=1e-5)
    assert out.requires_grad and len(store) == B * HKV * 10


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_close_to_fp32(dtype, tol):
    outs = {}
    for dt in (torch.float32, dtype):
        store = make_store(dt)
        layer = MemoryAttention(store, num_heads=H, k=5, positions="absolute", rope=RotaryEmbedding(D))
        start = 0
        for q, k, v in chunks(3, (6, 6), dtype=dt):
            out = layer(q, k, v, position_ids=torch.arange(start, start + 6))
            start += 6
        assert out.dtype == dt
        outs[dt] = out.float()
    assert (outs[dtype] - outs[torch.float32]).abs().max().item() < tol


def test_write_flag_and_empty_memory_is_local_attention():
    store = make_store()
    (q, k, v), = chunks(4, (5,))
    out = memory_attention(q, k, v, store, 8, write=False)
    assert len(store) == 0
    ref = reference(q, k, v, torch.zeros(B, HKV, 0, D), None, q, 8, D**-0.5)
    assert (out - ref).abs().max().item() < 1e-5
    memory_attention(q, k, v, store, 8)
    assert len(store) == B * HKV * 5


def test_explicit_mask_hides_local_keys():
    store = make_store()
    (q, k, v), = chunks(5, (4,))
    mask = torch.ones(B, 1, 4, 4, dtype=torch.bool).tril()
    mask[0, :, :, 0] = False  # batch 0: key 0 is padding
    mask[0, :, 0, 0] = True  # ...but query 0 must see something
    out = memory_attention(q, k, v, store, 4, attention_mask=mask, write=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0] += 100.0  # in batch 0 only query 0 sees key 0
    v2[:, :, 0] += 100.0
    out2 = memory_attention(q, k2, v2, store, 4, attention_mask=mask, write=False)
    assert torch.equal(out[0, :, 1:], out2[0, :, 1:])
    assert not torch.equal(out[1], out2[1])  # batch 1 has no padding


def test_bad_inputs_raise_named_errors():
    store = make_store()
    (q, k, v), = chunks(6, (3,))
    with pytest.raises(InvalidInputError, match="partitions"):
        memory_attention(q[:1], k[:1], v[:1], store, 2)
    with pytest.raises(InvalidInputError, match="k: expected"):
        memory_attention(q, k, v, store, -1)
    with pytest.raises(InvalidInputError, match="bool"):
        memory_attention(q, k, v, store, 2, attention_mask=torch.zeros(1, 1, 3, 3))
    with pytest.raises(InvalidInputError, match="key: expected"):
        memory_attention(q, k[:, :1].expand(B, 3, 3, D), v, store, 2)
    with pytest.raises(InvalidInputError, match="rope"):
        MemoryAttention(store, num_heads=H, positions="first")
    with pytest.raises(InvalidInputError, match="positions"):
        MemoryAttention(store, num_heads=H, positions="relative")
    with pytest.raises(InvalidInputError, match="rope: expected a kvmem.adapters.Rotary"):
        MemoryAttention(store, num_heads=H, positions="first", rope="rope")            # found by the fuzz
    with pytest.raises(InvalidInputError, match=f"rope: expected head_dim {D}"):
        MemoryAttention(store, num_heads=H, positions="first", rope=RotaryEmbedding(D + 2))
    assert len(store) == 0


@pytest.mark.parametrize("mode", ["absolute", "first"])
def test_position_ids_per_batch_row(mode):
    """position_ids (B, T) rotate each batch row at its own positions: the batch equals each row run alone."""
    (q0, k0, v0), (q1, k1, v1) = chunks(4, (6, 5))
    pos0 = torch.stack([torch.arange(6), torch.arange(3, 9)])               # row 1 starts later (left padding)
    pos1 = torch.stack([torch.arange(6, 11), torch.arange(12, 17)])        # ...and skips three positions
    batch = MemoryAttention(make_store(), num_heads=H, k=8, positions=mode, rope=RotaryEmbedding(D))
    both = [batch(q0, k0, v0, position_ids=pos0), batch(q1, k1, v1, position_ids=pos1)]
    for b in range(B):
        store = kvmem.create("exact", dim=D, value_dim=D, partitions=HKV, dtype=torch.float32)
        alone = MemoryAttention(store, num_heads=H, k=8, positions=mode, rope=RotaryEmbedding(D))
        rows = [alone(q0[b:b + 1], k0[b:b + 1], v0[b:b + 1], position_ids=pos0[b]),
                alone(q1[b:b + 1], k1[b:b + 1], v1[b:b + 1], position_ids=pos1[b])]
        for got, want in zip(both, rows):
            assert (got[b:b + 1] - want).abs().max().item() < 1e-5
    assert (both[1][0] - both[1][1]).abs().max() > 1e-3      # the rows really differ


def test_each_bad_argument_is_named_in_its_error():
    (q, k, v), = chunks(7, (3,))
    cases = [((None, k, v), {}, "query: expected a 4-D floating tensor, got NoneType"),
             ((q, k.long(), v), {}, r"key: expected a 4-D floating tensor, got torch.int64 \(2, 2, 3, 16\)"),
             ((q, k, v[0]), {}, r"value: expected a 4-D floating tensor, got torch.float32 \(2, 3, 16\)"),
             ((q, k.tolist(), v), {}, "key: expected a 4-D floating tensor, got list")]
    for args, kwargs, message in cases:                          # the functional form and the module alike
        with pytest.raises(InvalidInputError, match=message):
            memory_attention(*args, make_store(), 2, **kwargs)
        with pytest.raises(InvalidInputError, match=message):
            MemoryAttention(make_store(), num_heads=H, k=2, rope=RotaryEmbedding(D))(*args, **kwargs)
    layer = MemoryAttention(make_store(), num_heads=H, k=2, rope=RotaryEmbedding(D))
    for name in ("position_ids", "key_position_ids"):
        message = rf"{name}: expected integer positions \(3,\) or \(1 or 2, 3\), got torch.float32 \(3,\)"
        with pytest.raises(InvalidInputError, match=message):
            layer(q, k, v, **{name: torch.arange(3.0)})
    assert len(layer.store) == 0


def test_defaults_and_every_valid_setting_are_accepted():
    store = make_store()
    layer = MemoryAttention(store, num_heads=H)                 # positions "absolute", top-k 32, no gate
    assert (layer.config.positions, layer.config.k, layer.config.gate) == ("absolute", 32, False)
    (q, k, v), = chunks(8, (5,))
    got = MemoryAttention(make_store(), num_heads=H, scaling=0.125)(q, k, v)        # scaling below 1
    want = reference(q, k, v, k[:, :, :0], v[:, :, :0], q, 32, 0.125)              # empty memory: local only
    assert (got - want).abs().max() < 1e-5
    assert (MemoryAttention(make_store(), num_heads=H)(q, k, v) - want).abs().max() > 1e-3   # 0.125 was used
    assert MemoryAttention(make_store(), num_heads=H, k="all").config.k == "all"
    for bad in ("ALL", "every", "", 2.0, True, -1):
        with pytest.raises(InvalidInputError, match='k: expected an int >= 0 or "all"'):
            MemoryAttention(make_store(), num_heads=H, k=bad)


def test_keys_of_another_shape_and_bad_scalings_are_refused_and_a_broadcast_mask_is_taken():
    (q, k, v), = chunks(10, (3,))
    store = make_store()
    for bad in (torch.randn(B, HKV, 3, D + 1), torch.randn(B + 1, HKV, 3, D)):            # head dim, batch
        with pytest.raises(InvalidInputError, match=rf"key: expected \({B}, Hkv dividing {H}, Tl, {D}\)"):
            memory_attention(q, bad, bad[..., :D], store, 2)
    for scaling in (0, -0.5, float("inf"), float("nan"), "0.1"):
        with pytest.raises(InvalidInputError, match="scaling: expected a finite number > 0 or None"):
            MemoryAttention(store, num_heads=H, scaling=scaling)
    assert len(store) == 0
    causal = torch.ones(3, 3, dtype=torch.bool).tril().view(1, 1, 3, 3)                # one mask for every row
    assert torch.equal(memory_attention(q, k, v, make_store(), 2, attention_mask=causal),
                       memory_attention(q, k, v, make_store(), 2))
