"""kvmem: an external key-value memory for attention layers."""

__version__ = "0.1.0"
