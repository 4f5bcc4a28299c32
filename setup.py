"""The one compiled part of kvmem: the fused top-k selection of the exact CPU search (``kvmem/_kernels.c``).

Everything else is in pyproject.toml. The extension is optional: where no C compiler exists, the install
goes on and ``kvmem.topk`` selects with torch ops instead (same results, slower; ``kvmem info`` says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvmem._kernels", ["kvmem/_kernels.c"], optional=True, extra_compile_args=["-O3"])])
