"""kvmem.benchmarks: recall, speed and lookup benchmarks for kvmem's backends.

Modules (import the one you need; nothing heavy is imported here):

- ``datasets``: :class:`Dataset`, seeded generators, HDF5 / fvecs / fbin loaders
- ``recall``: blockwise exact ground truth and ann-benchmarks-style recall@k
- ``report``: result records, the text table, ``results.json``, progress bars
- ``plot``: recall-vs-QPS and lookup accuracy-vs-size PNGs (matplotlib, lazily)
"""
