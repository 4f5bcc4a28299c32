"""LongLLaMA inference, written in plain torch from its published description, for the tests.

Written from the Focused Transformer paper and the LongLLaMA README, not from
its code: a Llama decoder whose memory layers attend, with one softmax, to
their local context and to every (key, value) of their memory; memory keys
are stored as if at position 0 (before RoPE: the rotation at 0 is the
identity), queries keep their local positions. A long input is read in
windows of ``window`` tokens that go to memory after they are attended,
except the last ``last`` tokens, which stay as the local context. The local
context never exceeds the window: when a step would make it longer, it
leaves first (memory layers keep it in memory) and positions restart at 0.
"""

from __future__ import annotations

import torch


class Reference:
    """One batch of streams through the weights of a transformers ``LlamaForCausalLM``."""

    def __init__(self, model, mem_layers, window):
        c = model.config
        self.m, self.mem_layers, self.window = model, set(mem_layers), window
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.d = c.hidden_size // self.H
        self.eps = c.rms_norm_eps
        self.inv_freq = model.model.rotary_emb.inv_freq.float()  # the model's RoPE frequencies
        self.memory = {i: None for i in self.mem_layers}  # layer -> (keys, values) (B, Hkv, M, d)
        self.local = None  # per layer (keys before RoPE, values) (B, Hkv, n, d); positions 0..n-1

    def _norm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x, pos):  # x (B, h, T, d), pos (T,)
        f = pos.float()[:, None] * self.inv_freq[None]  # (T, d/2)
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _step(self, ids, to_memory):
        """Run ``ids (B, T)`` after the local context; returns logits (B, T, V)."""
        B, T = ids.shape
        n = 0 if self.local is None else self.local[0][0].shape[2]
        pos = torch.arange(n, n + T)
        G = self.H // self.Hkv
        h = self.m.model.embed_tokens(ids)
        new_local = []
        for i, layer in enumerate(self.m.model.layers):
            a = layer.self_attn
            x = self._norm(h, layer.input_layernorm.weight)
            q = a.q_proj(x).view(B, T, self.H, self.d).transpose(1, 2)
            k = a.k_proj(x).view(B, T, self.Hkv, self.d).transpose(1, 2)
            v = a.v_proj(x).view(B, T, self.Hkv, self.d).transpose(1, 2)
            if n:
                k_all, v_all = torch.cat([self.local[i][0], k], 2), torch.cat([self.local[i][1], v], 2)
            else:
                k_all, v_all = k, v
            new_local.append((k_all, v_all))
            qr = self._rope(q, pos)
            kr = self._rope(k_all, torch.arange(n + T)).repeat_interleave(G, 1)
            logits = qr @ kr.transpose(-1, -2) * self.d**-0.5  # (B, H, T, n + T)
            causal = torch.arange(n + T)[None, :] <= pos[:, None]
            logits = logits.masked_fill(~causal, float("-inf"))
            values = v_all.repeat_interleave(G, 1)
            mem = self.memory.get(i)
            if mem is not None:
                mk, mv = (t.repeat_interleave(G, 1) for t in mem)
                logits = torch.cat([qr @ mk.transpose(-1, -2) * self.d**-0.5, logits], -1)
                values = torch.cat([mv, values], 2)
            out = torch.softmax(logits, -1) @ values  # (B, H, T, d)
            h = h + a.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            mlp = layer.mlp
            y = self._norm(h, layer.post_attention_layernorm.weight)
            h = h + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(y)) * mlp.up_proj(y))
            if to_memory and i in self.mem_layers:
                self._remember(i, k, v)
        self.local = None if to_memory else new_local
        return self.m.lm_head(self._norm(h, self.m.model.norm.weight))

    def _remember(self, i, k, v):
        old = self.memory[i]
        self.memory[i] = (k, v) if old is None else (torch.cat([old[0], k], 2), torch.cat([old[1], v], 2))

    def _roll_if_needed(self, T):
        n = 0 if self.local is None else self.local[0][0].shape[2]
        if n and n + T > self.window:
            for i in self.mem_layers:
                self._remember(i, *self.local[i])
            self.local = None

    @torch.no_grad()
    def feed(self, ids, last=0):
        """Logits (B, N, V) of reading ``ids``; the last ``last`` tokens stay local."""
        head = ids.shape[1] - last
        out = [self._step(ids[:, s:min(s + self.window, head)], True) for s in range(0, head, self.window)]
        if last:
            out.append(self.forward(ids[:, head:]))
        return torch.cat(out, 1)

    @torch.no_grad()
    def forward(self, ids):
        """A forward that continues the local context (rolling it first when it would pass the window)."""
        self._roll_if_needed(ids.shape[1])
        return self._step(ids, False)

    @torch.no_grad()
    def follow(self, prompt, tokens):
        """Logits of each step of generating ``tokens`` (B, S) after ``prompt``: (B, S, V)."""
        steps = [self.forward(prompt)[:, -1]]
        for s in range(tokens.shape[1] - 1):
            steps.append(self.forward(tokens[:, s:s + 1])[:, -1])
        return torch.stack(steps, 1)
