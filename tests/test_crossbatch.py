"""CrossBatch training: the attention against a concatenated reference, its sources, errors, and a short run."""

import math

import pytest
import torch
from kvmem.adapters import MemoryAttention, RotaryEmbedding, crossbatch
from kvmem.adapters.crossbatch import crossbatch_attention, crossbatch_forward, memory_sources

from kvmem.errors import InvalidInputError


def _reference(q, k, v, docs, d, mq, mk, scaling, gate=None):
    """Loop over rows and heads: concatenate the memory blocks' keys, then one softmax (or two, gated)."""
    R, H, W, dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    n = R // docs
    out = []
    for r in range(R):
        b, j = divmod(r, n)
        heads = []
        for h in range(H):
            g = h // G
            local = q[r, h] @ k[r, g].T * scaling  # (W, W)
            causal = torch.ones(W, W, dtype=torch.bool).tril()
            local = local.masked_fill(~causal, -math.inf)
            if j == 0:
                mkeys = torch.zeros(0, dh, dtype=q.dtype)
                mvals = torch.zeros(0, v.shape[-1], dtype=q.dtype)
            else:
                rows = [((b + i) % docs) * n + j - 1 for i in range(d)]
                mkeys = torch.cat([mk[s, g] for s in rows])  # (d*W, dh)
                mvals = torch.cat([v[s, g] for s in rows])
            mem = mq[r, h] @ mkeys.T * scaling  # (W, d*W)
            if gate is None:
                w = torch.softmax(torch.cat([mem, local], -1), -1)
                heads.append(w[:, : mem.shape[1]] @ mvals + w[:, mem.shape[1] :] @ v[r, g])
            else:
                s = torch.sigmoid(gate[h])
                m_out = torch.softmax(mem, -1) @ mvals if j else torch.zeros(W, v.shape[-1], dtype=q.dtype)
                heads.append(s * m_out + (1 - s) * torch.softmax(local, -1) @ v[r, g])
        out.append(torch.stack(heads))
    return torch.stack(out)


def _inputs(docs=3, windows=2, H=4, Hkv=2, W=3, dh=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R = docs * windows
    shapes = [(R, H, W, dh), (R, Hkv, W, dh), (R, Hkv, W, dh + 1), (R, H, W, dh), (R, Hkv, W, dh)]
    return [torch.randn(*s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


@pytest.fixture(params=["columns", "gathered"])
def layout(request, monkeypatch):
    """Both ways of scoring memory: every document's window masked, or each row's blocks copied out."""
    monkeypatch.setattr(crossbatch, "_by_columns", lambda *_: request.param == "columns")
    return request.param


@pytest.mark.parametrize("docs, windows, d", [(3, 2, 1), (3, 2, 2), (3, 2, 3), (5, 3, 2), (5, 3, 4)])
def test_crossbatch_equals_the_concatenated_reference_in_values_and_gradients(docs, windows, d, layout):
    q, k, v, mq, mk = _inputs(docs=docs, windows=windows)
    ours = crossbatch_attention(q, k, v, docs=docs, d=d, memory_query=mq, memory_key=mk, scaling=0.7)
    ref = _reference(q, k, v, docs, d, mq, mk, 0.7)
    torch.testing.assert_close(ours, ref)
    grad = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, (q, k, v, mq, mk), grad)
    g_ref = torch.autograd.grad(ref, (q, k, v, mq, mk), grad)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in g_ours)  # gradients reach queries, keys and values


def test_one_window_per_document_attends_to_itself_only():
    q, k, v, mq, mk = _inputs(docs=3, windows=1)
    gate = torch.randn(4, dtype=torch.float64)
    for g in (None, gate):
        ours = crossbatch_attention(q, k, v, docs=3, d=2, memory_query=mq, memory_key=mk, scaling=0.7, gate=g)
        torch.testing.assert_close(ours, _reference(q, k, v, 3, 2, mq, mk, 0.7, g))


def test_crossbatch_gradcheck_float64(layout):
    q, k, v, mq, mk = _inputs(docs=2, windows=2, H=2, Hkv=1, W=2, dh=2)
    gate = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, mq, mk, gate):
        return crossbatch_attention(q, k, v, docs=2, d=2, memory_query=mq, memory_key=mk, gate=gate)

    assert torch.autograd.gradcheck(f, (q, k, v, mq, mk, gate))
    torch.testing.assert_close(f(q, k, v, mq, mk, gate), _reference(q, k, v, 2, 2, mq, mk, 2**-0.5, gate))


def test_positives_and_negatives_come_from_the_documents_they_should(layout):
    docs, windows, W, d = 4, 3, 2, 3
    R = docs * windows
    # value = one-hot of the row it comes from; zero queries attend uniformly, so mass shows the sources
    value = torch.eye(R).repeat_interleave(W, 0).view(R, W, R).unsqueeze(1)  # (R, 1, W, R)
    query, key = torch.zeros(R, 1, W, 4), torch.zeros(R, 1, W, 4)
    out = crossbatch_attention(query, key, value, docs=docs, d=d)  # (R, 1, W, R)
    sources = memory_sources(docs, windows, d)
    for r in range(R):
        b, j = divmod(r, windows)
        expected = {r} | ({((b + i) % docs) * windows + j - 1 for i in range(d)} if j else set())
        assert set(out[r, 0, -1].nonzero().flatten().tolist()) == expected
        if j:
            assert sources[r, 0].tolist() == [b, j - 1]  # the positive: own document, previous window
            assert {tuple(s) for s in sources[r, 1:].tolist()} == {((b + i) % docs, j - 1) for i in range(1, d)}
        else:
            assert (sources[r, :, 1] == -1).all()


def test_crossbatch_forward_on_memory_attention_matches_the_core():
    torch.manual_seed(0)
    B, H, Hkv, N, W, dh = 2, 4, 2, 6, 3, 8
    rope = RotaryEmbedding(dh)
    attn = MemoryAttention(None, num_heads=H, positions="first", rope=rope, gate=False)
    q, k, v = torch.randn(B, H, N, dh), torch.randn(B, Hkv, N, dh), torch.randn(B, Hkv, N, dh)
    out = crossbatch_forward(attn, q, k, v, window=W, d=2)  # (B, H, N, dh)
    # document 0, window 1 by hand: memory = window 0 of documents 0 and 1, keys at position 0 (identity)
    pos = torch.arange(W)
    qw = rope.rotate(q[:, :, W:], pos)
    kw = rope.rotate(k[:, :, W:], pos)
    mk = torch.cat([k[0, :, :W], k[1, :, :W]], 1)  # (Hkv, 2W, dh), unrotated = rotated at 0
    mv = torch.cat([v[0, :, :W], v[1, :, :W]], 1)
    qg = qw[0].view(Hkv, 2, W, dh)
    logits = torch.cat([qg @ mk.transpose(-1, -2).unsqueeze(1),
                        (qg @ kw[0].transpose(-1, -2).unsqueeze(1)).masked_fill(~torch.ones(W, W).tril().bool(),
                                                                               -math.inf)], -1) * dh**-0.5
    want = torch.softmax(logits, -1) @ torch.cat([mv, v[0, :, W:]], 1).unsqueeze(1)  # (Hkv, 2, W, dh)
    torch.testing.assert_close(out[0, :, W:], want.reshape(H, W, dh), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("d", "N", "W", "match"), [(0, 6, 3, "d: expected an int >= 1"),
                                                     (3, 6, 3, "at most the 2 documents"),
                                                     (1, 6, 4, "divisor of the sequence length 6")])
def test_bad_settings_raise(d, N, W, match):
    attn = MemoryAttention(None, num_heads=2, positions="none")
    q, k = torch.randn(2, 2, N, 4), torch.randn(2, 1, N, 4)
    with pytest.raises(InvalidInputError, match=match):
        crossbatch_forward(attn, q, k, k, window=W, d=d)
    with pytest.raises(InvalidInputError, match="d: expected"):
        crossbatch_attention(q[:, :, :3], k[:, :, :3], k[:, :, :3], docs=2, d=0)
    with pytest.raises(InvalidInputError, match="docs: expected"):
        crossbatch_attention(q[:, :, :3], k[:, :, :3], k[:, :, :3], docs=3, d=1)
