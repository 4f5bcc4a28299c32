"""The one compiled part of kvmem, ``kvmem/_kernels.c``: the running top-k of the exact CPU search and the
gather-and-score of the rows a search returns (:mod:`kvmem.kernels`).

Everything else is in pyproject.toml. The extension is optional: where no C compiler exists, the install
goes on and kvmem uses torch ops instead (the same results, slower; ``kvmem bench`` says which in its
first line, ``kvmem.kernels.available()`` in code).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvmem._kernels", ["kvmem/_kernels.c"], optional=True, extra_compile_args=["-O3"])])
