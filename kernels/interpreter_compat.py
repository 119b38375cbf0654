"""A fix for the Triton interpreter of triton < 3.7 under NumPy >= 2.4, applied on import.

The interpreter holds every scalar kernel argument as a one-element 1-D array and gives its
tensors ``__index__ = int(handle.data)``. NumPy 2.4 refuses ``int()`` of a 1-D array
("only 0-dimensional arrays can be converted to Python scalars"), so any ``range(0, K,
BLOCK_K)`` over a runtime bound fails under ``TRITON_INTERPRET=1``. Triton 3.7 squeezes the
array first; this backports exactly that to older interpreters, and does nothing where the
interpreter already squeezes (or is not in use). GPU compilation never goes through it.
"""

from __future__ import annotations

import inspect


def _index_of_scalar(tensor) -> int:
    return int(tensor.handle.data.squeeze())


def needs_index_fix(interpreter_module) -> bool:
    """Whether this interpreter's ``__index__`` converts the raw (1-D) array with ``int``."""
    patch = getattr(interpreter_module, "_patch_lang_tensor", None)
    if patch is None:
        return False
    try:
        source = inspect.getsource(patch)
    except (OSError, TypeError):
        return False
    return "int(self.handle.data)" in source


def apply() -> bool:
    """Install the fix into ``triton.runtime.interpreter`` if it needs one; returns whether it did."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_lora_fused_index_fix", False) or not needs_index_fix(interpreter):
        return False
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index_of_scalar)

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._lora_fused_index_fix = True
    return True
