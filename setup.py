"""Builds flowkern's C++ trie extension; everything else is in pyproject.toml.

The extension is the top-level module `_flowkern_trie`, not `flowkern._trie`: a copy of the
flowkern/ sources that is imported ahead of the installed package (`python -m flowkern.train`
run from a clone's root puts the clone first on sys.path) still finds the installed extension.
"""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension("_flowkern_trie", ["csrc/trie.cpp"], cxx_std=17,
                          extra_compile_args=["-O3"]),
    ],
)
