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


def _chunk_footprint(rows, r_pad, n, element_size, groups_in_flight):
    # What the dB steps of the groups in flight hold in L2: their chunks of g and their fp32 dB and db partial slices.
    return groups_in_flight * (rows * n * element_size + n * (r_pad + 1) * 4)


@pytest.mark.parametrize("r_pad", R_PADS)
@pytest.mark.parametrize("block_m", [32, 64, 128, 256])
def test_db_rows_capped_to_a_share_of_l2(monkeypatch, r_pad, block_m):
    # The largest chunk of the power-of-two ladder below the uncapped one whose footprint fits in L2/4, or one row
    # block when none does; always a multiple of BLOCK_M.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    uncapped = triton_configs.backward_db_rows(r_pad, block_m)
    for l2 in (6 << 20, 40 << 20, 50 << 20):
        budget = l2 / triton_configs.DB_CHUNK_L2_SHARE
        for n in (45, 768, 2304, 3072, 14336):
            for element_size in (2, 4):
                for in_flight in (1, 2, 11, 22, 66):
                    rows = triton_configs.backward_db_rows(r_pad, block_m, n, element_size, in_flight, l2)
                    case = (r_pad, block_m, l2, n, element_size, in_flight, rows)
                    assert block_m <= rows <= uncapped and rows % block_m == 0, case
                    fits = _chunk_footprint(rows, r_pad, n, element_size, in_flight) <= budget
                    assert fits or rows == block_m, case
                    if rows < uncapped:  # halved: the chunk twice as long does not fit
                        assert _chunk_footprint(2 * rows, r_pad, n, element_size, in_flight) > budget, case


def test_db_rows_cap_on_the_reviewed_shapes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h100 = 50 << 20
    # ViT-B qkv, r <= 16, 128-row tiles: 11 groups in flight (132 SMs, 12 column blocks) keep 128-row chunks.
    assert triton_configs.backward_db_rows(16, 128, 2304, 2, 11, h100) == 128
    # r = 64, fc1-like N 3072: 512 rows uncapped would hold 11 × 3.1 MB; one 128-row block per step.
    assert triton_configs.backward_db_rows(64, 128, 3072, 2, 11, h100) == 128
    # LLM MLP N 14336 at R_PAD 256: 2 groups' slices alone are 29 MB > L2/4; one 32-row block per step.
    assert triton_configs.backward_db_rows(256, 32, 14336, 2, 2, h100) == 32
    # A narrow layer keeps the rank's chunk: N 768, R_PAD 32, 22 groups on 50 MB (22 × 0.5 MB of 12.5 MB).
    assert triton_configs.backward_db_rows(32, 64, 768, 2, 22, h100) == 256


def test_no_l2_cap_off_a_gpu():
    assert triton_configs.l2_bytes(torch.device("cpu")) == 0
    args = {"g_ptr": torch.empty(4, 8), "R_PAD": 16, "BLOCK_M": 32, "BLOCK_N": 32, "N": 8, "K": 70, "M": 260,
            "rows_per_group": 160}
    assert triton_configs.backward_db_rows_of_launch(args) == triton_configs.backward_db_rows(16, 32)
