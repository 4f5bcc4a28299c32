"""Rotary position embedding (RoPE), forwards and backwards.

Memory attention needs to move keys and queries between positions: a key
stored "at position 0" (LongLLaMA), a query moved by the number of tokens
already in memory, a key taken back to "no position". With the rotate-half
RoPE of Llama, Mistral, Qwen2 and most decoders, the rotation at position p is

    R(p) x = x * cos(p) + rotate_half(x) * sin(p)

and it is a rotation (times ``attention_scaling`` where a RoPE variant scales
cos and sin), so ``R(p)^-1 x = (x * cos(p) - rotate_half(x) * sin(p)) / s²``
with ``s² = cos² + sin²`` elementwise.

:class:`RotaryEmbedding` is a plain RoPE for layers written by hand; the
Hugging Face adapter builds a :class:`Rotary` on the model's own rotary module
so that cos and sin are exactly those the model used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Rotary", "RotaryEmbedding", "rotate", "unrotate", "rotate_half"]

# positions (B or 1, T) int64 -> cos, sin (B or 1, T, d) float32
CosSin = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R(p) x for x (B, H, T, d) and cos/sin (B or 1, T, d); computed in fp32, returned in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R(p)^-1 x, the inverse of :func:`rotate` with the same cos/sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
    xf = x.float()
    return ((xf * cos - rotate_half(xf) * sin) / (cos * cos + sin * sin)).to(x.dtype)


class Rotary:
    """Rotations by position for one head size, backed by a cos/sin function.

    ``cos_sin(positions)`` maps int64 positions ``(B or 1, T)`` to float32
    ``cos, sin`` of shape ``(B or 1, T, head_dim)``. Stateless apart from that
    function; safe to share between layers and threads.
    """

    def __init__(self, cos_sin: CosSin, head_dim: int):
        self._cos_sin = cos_sin
        self.head_dim = head_dim

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions)
        return cos.float(), sin.float()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, d) at positions (B or 1, T) -> R(positions) x."""
        return rotate(x, *self.cos_sin(_as_positions(positions, x)))

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, d) rotated at positions (B or 1, T) -> the unrotated x."""
        return unrotate(x, *self.cos_sin(_as_positions(positions, x)))

    def shift(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Move x (B, H, T, d) by ``offset`` positions: R(offset) x."""
        if offset == 0:
            return x
        positions = torch.full((1, x.shape[-2]), offset, dtype=torch.long, device=x.device)
        return rotate(x, *self.cos_sin(positions))


def _as_positions(positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    positions = torch.as_tensor(positions, device=x.device).long()
    if positions.ndim == 1:
        positions = positions.unsqueeze(0)  # (1, T)
    return positions


class RotaryEmbedding(nn.Module, Rotary):
    """Plain rotate-half RoPE (``base`` 10000 by default) for hand-written layers.

    >>> rope = RotaryEmbedding(head_dim=64)
    >>> q = rope.rotate(q, torch.arange(T))   # (B, H, T, 64)
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        nn.Module.__init__(self)
        if head_dim % 2:
            from kvmem.errors import InvalidInputError

            raise InvalidInputError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (d/2,)
        Rotary.__init__(self, self._table, head_dim)

    def _table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.rotate(x, positions)
