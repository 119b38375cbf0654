"""Bytes saved for backward by one Triton LoRA layer, measured beside PEFT's LoRA layer.

DESIGN.md §1: a fused layer saves ``x`` itself (no copy), ``xa`` and the seed, plus
references to its parameters; no mask and no dropped copy of x. PEFT's layer keeps the
dropped x (and the dropout mask) when dropout is on, which is the memory a fused layer saves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lora_fused
from lora_fused.kernels import configs as triton_configs

peft = pytest.importorskip("peft")

INTERPRETING = triton_configs.interpreting()
DEVICE = "cpu" if INTERPRETING else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(),
    reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1",
)

M_LEADING, K, N, RANK = (2, 40), 48, 36, 4


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


def _saved_bytes(run) -> int:
    """Bytes of distinct storages that autograd saves while ``run()`` builds its graph."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    out.sum().backward()  # the saved graph must still be usable
    return sum(storages.values())


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_saved_bytes_within_x_plus_xa_and_below_peft(dropout):
    torch.manual_seed(0)
    x = torch.randn(*M_LEADING, K, device=DEVICE, requires_grad=True)
    rows = x.numel() // K

    layer = lora_fused.LoRALinear(K, N, rank=RANK, alpha=8.0, dropout=dropout, backend="triton").to(DEVICE).train()
    nn.init.normal_(layer.lora_B)
    ours = _saved_bytes(lambda: layer(x))
    xa_bytes = rows * RANK * 4
    seed_bytes = 8
    budget = _nbytes(x, layer.weight, layer.lora_A, layer.lora_B) + xa_bytes + seed_bytes
    assert ours <= budget, f"fused layer saved {ours} bytes, budget bytes(x)+bytes(xa)+params = {budget}"

    config = peft.LoraConfig(r=RANK, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"])
    peft_model = peft.get_peft_model(_OneLinear(), config).to(DEVICE).train()
    theirs = _saved_bytes(lambda: peft_model(x))
    print(f"\nsaved for backward, dropout={dropout}: fused {ours} B, PEFT {theirs} B, x itself {_nbytes(x)} B")
    if dropout > 0:
        # PEFT keeps a dropped copy of x (on some devices also its mask) where the fused layer keeps an 8-byte seed.
        assert theirs - ours >= _nbytes(x) - seed_bytes, (ours, theirs)
