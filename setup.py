"""Builds flowkern's C++ trie extension; everything else is in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension("flowkern._trie", ["csrc/trie.cpp"], cxx_std=17,
                          extra_compile_args=["-O3"]),
    ],
)
