"""kvmem.adapters: plug a kvmem memory into attention layers.

- :func:`memory_attention` / :class:`MemoryAttention`: memory attention in plain
  PyTorch (FoT joint softmax or Memorizing Transformers gate, grouped-query
  heads, position modes "absolute" / "first" / "none").
- :mod:`kvmem.adapters.hf`: ``attach(model, ...)`` for Hugging Face decoders
  (imported on demand; it needs ``transformers``).
"""

from .attention import POSITION_MODES, MemoryAttention, MemoryAttentionConfig, memory_attention
from .rope import Rotary, RotaryEmbedding

__all__ = [
    "POSITION_MODES",
    "MemoryAttention",
    "MemoryAttentionConfig",
    "memory_attention",
    "Rotary",
    "RotaryEmbedding",
]
