"""Test set-up shared by every test file.

- Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be
  switched on before triton is first imported.
- ``torch.empty``-style allocations are filled with NaN (float dtypes), so a kernel that
  leaves an output element unwritten fails parity instead of passing on lucky zeros.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_real_empty = torch.empty
_real_empty_like = torch.empty_like
_real_new_empty = torch.Tensor.new_empty


def _nan_filled(tensor):
    if tensor.is_floating_point() and tensor.numel() and not torch.compiler.is_compiling():
        tensor.fill_(float("nan"))
    return tensor


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_filled(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_filled(_real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _nan_filled(_real_new_empty(self, *a, **k)))
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer CPU tests (training runs, torchrun)")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch.cuda.is_available() is False")
