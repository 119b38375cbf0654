"""The backward's dB/db chunk (DB_ROWS, kernels/configs.py backward_db_rows): a multiple of BLOCK_M for every tile.

The kernel fires a dB step when a row block ends on a chunk boundary; with BLOCK_M not dividing DB_ROWS a group's
first chunk is never stored and dB/db come out NaN (poisoned) or silently wrong (review of issue 10, A1). The kernel's
static_assert rejects such a launch; these tests check that the launcher never makes one.
"""

from __future__ import annotations

import pytest
import torch

from lora_fused.kernels import backward as triton_backward_module
from lora_fused.kernels import configs as triton_configs
from lora_fused.kernels import ops as triton_ops
from parity import make_inputs

INTERPRETING = triton_configs.interpreting()
R_PADS = (16, 32, 64, 128, 256)
# Every backward tile a launch can get: both GPU lists, the interpreter's, and a 256-row tile no list has yet.
TILE_LISTS = {"hopper": triton_configs._BACKWARD_HOPPER, "ampere": triton_configs._BACKWARD_AMPERE,
              "wide": [triton_configs._tile(256, 64, 64, 8, 3)]}


def _block_ms(interpreted: bool, monkeypatch) -> set[int]:
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
    if interpreted:
        return {c.kwargs["BLOCK_M"] for c in triton_configs.backward_configs()}
    return {c.kwargs["BLOCK_M"] for tiles in TILE_LISTS.values() for c in tiles}


@pytest.mark.parametrize("interpreted", [False, True], ids=["gpu", "interpreter"])
@pytest.mark.parametrize("r_pad", R_PADS)
def test_db_rows_is_a_multiple_of_every_block_m(monkeypatch, interpreted, r_pad):
    for block_m in _block_ms(interpreted, monkeypatch):
        rows = triton_configs.backward_db_rows(r_pad, block_m)
        assert rows >= block_m and rows % block_m == 0, (r_pad, block_m, rows)


def test_db_rows_without_a_cap_follows_the_rank(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert [triton_configs.backward_db_rows(r_pad, 32) for r_pad in R_PADS] == [128, 256, 512, 1024, 1024]
    assert triton_configs.backward_db_rows(16, 256) == 256  # a tile wider than the chunk: one row block per step


@pytest.mark.parametrize("db_rows", [32, 96, 48, 20])
def test_interpreter_db_rows_rounds_down_to_its_block(monkeypatch, db_rows):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_configs, "DB_ROWS_INTERPRETER", db_rows)
    assert triton_configs.backward_db_rows(16, 32) == max(32, db_rows // 32 * 32)


@pytest.mark.skipif(not INTERPRETING, reason="launches the backward under the interpreter")
def test_kernel_rejects_db_rows_not_a_multiple_of_block_m(monkeypatch):
    block_m = triton_configs.backward_configs()[0].kwargs["BLOCK_M"]
    monkeypatch.setattr(triton_backward_module, "backward_db_rows_of_launch", lambda args: block_m + block_m // 2)
    x, weight, _, lora_A, lora_B = make_inputs(100, 40, 30, 4, torch.float32)
    seed = torch.tensor(0, dtype=torch.int64)
    _, xa = triton_ops.triton_forward(x, weight, None, lora_A, lora_B, 2.0, 0.0, seed)
    with pytest.raises(Exception, match="DB_ROWS must be a multiple of BLOCK_M"):
        triton_ops.triton_backward(torch.ones(100, 30), x, weight, lora_A, lora_B, xa, 2.0, 0.0, seed, True, True)
