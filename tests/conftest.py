"""Test set-up shared by every test file.

- Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be
  switched on before triton is first imported.
- ``torch.empty``-style allocations are filled with NaN (float dtypes), so a kernel that
  leaves an output element unwritten fails parity instead of passing on lucky zeros; and
  ``LORA_FUSED_POISON_OUTPUTS=1`` (lora_fused/debug.py) makes the backends do the same to
  every output and workspace they allocate themselves, in C++ (``at::empty``) included.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LORA_FUSED_POISON_OUTPUTS", "1")

_real_empty = torch.empty
_real_empty_like = torch.empty_like
_real_new_empty = torch.Tensor.new_empty


def _nan_filled(tensor):
    if tensor.is_floating_point() and tensor.numel() and not torch.compiler.is_compiling():
        # no_grad: the allocation may be a leaf that requires grad (torch.empty(..., requires_grad=True),
        # as inductor's pad_mm set-up makes on torch 2.11); filling it is not part of any graph.
        with torch.no_grad():
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


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (CI shares two cores; one thread avoids spin contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_extension_or_skip_module() -> None:
    """Load lora_fused._C for a test module, or skip the module saying why; under
    LORA_FUSED_REQUIRE_EXTENSION=1 (make test, CI) a missing build fails instead."""
    from lora_fused import extension
    from lora_fused.backends import BackendUnavailableError

    try:
        extension.load()
    except BackendUnavailableError as exc:
        if os.environ.get("LORA_FUSED_REQUIRE_EXTENSION", "") not in ("", "0"):
            raise
        pytest.skip(f"lora_fused._C is not built: {exc}", allow_module_level=True)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch.cuda.is_available() is False")
