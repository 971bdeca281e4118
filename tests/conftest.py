"""Without a CUDA GPU the Triton kernels run in the Triton interpreter (tests/test_kernels.py).

TRITON_INTERPRET=1 must be set before triton is first imported: triton decorates its own
library then, torch._dynamo imports triton early, and later lazy imports of triton modules
assert the same mode.  So it is set here, before any test module is imported, for the whole
session.  It changes nothing else: no other test runs Triton code, and flowkern's default
for CPU tensors is the PyTorch path whatever the variable says.  With a CUDA GPU it is left
unset and the same tests run the compiled kernels.
"""

import importlib.util
import os

import pytest
import torch

INTERPRETED = not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (registered in pyproject.toml, so `pytest -m gpu` selects them) are
    skipped without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
