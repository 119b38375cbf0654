"""The interpreter fix of kernels/interpreter_compat.py: runtime loop bounds work on every triton.

On triton < 3.7 with NumPy >= 2.4, ``range(0, K, BLOCK)`` over a runtime ``K`` failed under
the interpreter with "only 0-dimensional arrays can be converted to Python scalars".
"""

from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl

from lora_fused.kernels import configs, interpreter_compat

pytestmark = pytest.mark.skipif(not configs.interpreting(), reason="checks the Triton interpreter (TRITON_INTERPRET=1)")


@triton.jit(do_not_specialize=["K"])
def _strided_sum_kernel(in_ptr, out_ptr, K, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        total += tl.load(in_ptr + k0 + offsets, mask=k0 + offsets < K, other=0.0)
    tl.store(out_ptr, tl.sum(total, axis=0))


@pytest.mark.parametrize("K", [1, 17, 64, 100])
def test_runtime_loop_bound_runs_under_the_interpreter(K):
    values = torch.arange(K, dtype=torch.float32)
    out = torch.full((1,), float("nan"))
    _strided_sum_kernel[(1,)](values, out, K, BLOCK=16)
    assert out.item() == K * (K - 1) / 2


def test_fix_applies_only_to_interpreters_that_convert_the_raw_array():
    def old_patch(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    def new_patch(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    assert interpreter_compat.needs_index_fix(types.SimpleNamespace(_patch_lang_tensor=old_patch))
    assert not interpreter_compat.needs_index_fix(types.SimpleNamespace(_patch_lang_tensor=new_patch))
    assert not interpreter_compat.needs_index_fix(types.SimpleNamespace())
    # Importing the kernels applied it once where needed; a second call changes nothing.
    assert interpreter_compat.apply() is False
