"""The cost model (benchmarks/cost_model.py) and the Triton launch plan it reads (kernels/plan.py).

The launch-count test runs a forward and a backward under the interpreter with every
kernel launch recorded, and checks the sequence against the plan: the model's triton
entries describe what the launchers really do.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import triton

from lora_fused.kernels import configs as triton_configs
from lora_fused.kernels import ops as triton_ops
from lora_fused.kernels import plan
from lora_fused.kernels.plan import launch_plan
from parity import make_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cost_model  # noqa: E402

INTERPRETING = triton_configs.interpreting()


@pytest.fixture
def recorded_launches(monkeypatch):
    from triton.runtime import interpreter

    launches = []
    real_run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording_run)
    return launches


@pytest.mark.skipif(not INTERPRETING, reason="counts launches through the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("rank,dropout_p,compute_dx,compute_db", [
    (4, 0.0, True, True), (4, 0.1, True, False), (16, 0.0, True, True), (100, 0.0, True, True),
    (4, 0.0, False, True), (100, 0.3, False, False),
])
def test_launches_match_the_plan(recorded_launches, rank, dropout_p, compute_dx, compute_db):
    M, K, N = 40, 33, 45
    x, weight, bias, lora_A, lora_B = make_inputs(M, K, N, rank, torch.float16, bias=compute_db)
    seed = torch.tensor(3, dtype=torch.int64)
    plan = launch_plan(M, K, N, rank, x.element_size(), dropout_p, compute_dx, compute_db, has_bias=compute_db)

    _, xa = triton_ops.triton_forward(x, weight, bias, lora_A, lora_B, 1.5, dropout_p, seed)
    assert recorded_launches == [launch.kernel for launch in plan["forward"]]
    recorded_launches.clear()
    triton_ops.triton_backward(torch.randn(M, N, dtype=torch.float16), x, weight, lora_A, lora_B, xa, 1.5,
                               dropout_p, seed, compute_dx, compute_db)
    assert recorded_launches == [launch.kernel for launch in plan["backward"]]


def test_linear_entry_is_the_textbook_gemm():
    M, K, N = 4096, 768, 2304
    forward, = cost_model.linear_plan(M, K, N, 2)["forward"]
    assert forward.mma_flops == 2 * M * N * K
    assert forward.bytes == 2 * (M * K + N * K + N + M * N)


def test_roofline_takes_the_slower_of_memory_and_compute_per_launch():
    gpu = cost_model.GPU("test", tflops_16bit=1.0, tflops_tf32=0.5, hbm_tb_s=1.0)
    memory_bound = cost_model.Launch("a", reads=2 * 10**12, writes=0, mma_flops=10**12)
    compute_bound = cost_model.Launch("b", reads=10**12, writes=0, mma_flops=3 * 10**12)
    assert cost_model.roofline_ms([memory_bound, compute_bound], gpu, elt=2) == pytest.approx(5e3)
    assert cost_model.roofline_ms([compute_bound], gpu, elt=4) == pytest.approx(6e3)


@pytest.mark.parametrize("provider", cost_model.PROVIDERS)
def test_every_lora_provider_costs_at_least_the_frozen_linear(provider):
    gpu = cost_model.GPUS["H100-SXM"]
    for name, K, N in cost_model.VIT_B_LAYERS:
        for p in (0.0, 0.1):
            for mode in cost_model.MODES:
                base = cost_model.estimate("linear", 4096, K, N, 16, 2, p, mode, gpu)
                est = cost_model.estimate(provider, 4096, K, N, 16, 2, p, mode, gpu)
                assert est.bytes >= base.bytes and est.mma_flops >= base.mma_flops, (name, p, mode)
                assert est.roofline_ms >= base.roofline_ms


def test_the_fused_backward_reads_less_than_the_unfused_ones():
    # The point of fusion: at ViT-B qkv, triton moves fewer bytes than PEFT and addmm in a full step,
    # and issue 10's plan (the code) fewer than the plan it replaced.
    args = (4096, 768, 2304, 16, 2, 0.1, "full", None)
    moved = {p: cost_model.estimate(p, *args).bytes for p in ("peft", "addmm", "triton", "triton_v1")}
    assert moved["triton"] < moved["triton_v1"] < moved["addmm"] < moved["peft"], moved


def test_device_names_map_to_gpu_entries():
    assert cost_model.gpu_for_device_name("NVIDIA H100 80GB HBM3") is cost_model.GPUS["H100-SXM"]
    assert cost_model.gpu_for_device_name("NVIDIA H200") is cost_model.GPUS["H200"]
    assert cost_model.gpu_for_device_name("NVIDIA A100-SXM4-80GB") is cost_model.GPUS["A100-SXM"]
    assert cost_model.gpu_for_device_name("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(ValueError, match="unknown provider"):
        cost_model.provider_plan("nope", 1, 1, 1, 1, 2, 0.0)


def test_schedules_fill_the_sms_in_the_fewest_rounds():
    # 32 row blocks × 6 column blocks on 132 SMs: one column block per program is 192 programs in 2 rounds,
    # two per program 96 programs in 1 round of 2 blocks: as fast, xa computed half as often.
    assert triton_configs.blocks_per_program(32, 6, 132, 16 / 128) == 2
    # When M fills the GPU, a forward program walks all of its row block's columns: xa once per row block.
    assert triton_configs.forward_columns_per_program(131072, 768, 128, 128, 16, 132) == 6
    # Backward row groups: whole aligned row blocks, as few groups (sets of partials) as finish as soon as one
    # row block per program would (rounds × row blocks per program).
    align = triton_configs.row_align()
    groups, rows = triton_configs.backward_row_groups(64 * align, 6, 132)
    assert rows % align == 0 and groups * rows >= 64 * align > (groups - 1) * rows
    assert triton.cdiv(groups * 6, 132) * (rows // align) == triton.cdiv(64 * 6, 132) and groups < 64


def test_triton_plan_takes_the_gpus_sm_count():
    # lin2 at M = 16384: the row groups (hence the partials' bytes) differ between 108 and 132 SMs.
    shape = (16384, 3072, 768, 16, 2, 0.0)
    a100 = cost_model.GPUS["A100-SXM"]
    on_a100 = plan.launch_plan(*shape, compute_dx=True, compute_db=False, sms=108)
    assert on_a100 != plan.launch_plan(*shape, compute_dx=True, compute_db=False, sms=132)
    assert cost_model.provider_plan("triton", *shape, sms=a100.sms) == on_a100
    est = cost_model.estimate("triton", *shape, "backward", a100)
    assert est.bytes == sum(launch.bytes for launch in on_a100["backward"])
    assert [g.sms for g in cost_model.GPUS.values()] == [132, 132, 108]


def test_backward_plan_counts_gb_at_the_dx_tile_and_a_only_with_dx():
    M, K, N, r, elt = 4096, 768, 2304, 16, 2
    with_dx, without_dx = (plan.backward_plan(M, K, N, r, elt, 0.0, compute_dx=dx, compute_db=False)[0]
                           for dx in (True, False))
    gb_with_dx = 2 * M * N * 16 * -(-K // plan.BACKWARD_DX_BLOCK_N)
    gb_without_dx = 2 * M * N * 16 * -(-K // plan.PLAN_BLOCK_N)
    assert with_dx.mma_flops - without_dx.mma_flops == (2 * M * N * K + 2 * M * K * 16) + gb_with_dx - gb_without_dx
    w, a = N * K * elt, r * K * elt
    assert with_dx.reads - without_dx.reads == w + a


@pytest.mark.parametrize("sms", [108, 132])
@pytest.mark.parametrize("m", [4096, 8576, 16384])
def test_backward_row_groups_are_bounded_by_two_rounds(m, sms):
    # Issue 10 B4: a round saved by more groups is not worth partials that grow with each group.
    for k in (768, 3072):
        for block_n in (plan.BACKWARD_DX_BLOCK_N, plan.PLAN_BLOCK_N):
            col_blocks = triton.cdiv(k, block_n)
            groups, rows = triton_configs.backward_row_groups(m, col_blocks, sms)
            assert groups <= max(1, 2 * sms // col_blocks), (m, k, block_n, groups)
            assert groups * rows >= m > (groups - 1) * rows


def test_cuda_plan_runs_the_sm90_kernel_on_hopper_16bit_only():
    """csrc/cuda_ops.cpp's dispatch: fp16/bf16 forward and dx on the sm90 TMA + wgmma kernel on
    Hopper (H100/H200 entries), the sm80 kernels on the A100 and for fp32 (TF32) everywhere."""

    def names(gpu, elt):
        plan = cost_model.provider_plan("cuda", 4096, 768, 2304, 16, elt, 0.1, sms=gpu.sms, hopper=gpu.hopper)
        return [launch.kernel for launch in plan["forward"] + plan["backward"]]

    for key in ("H100-SXM", "H200"):
        hopper = names(cost_model.GPUS[key], 2)  # r = 16: the sm90 dx computes gb itself
        assert "forward (sm90 TMA + wgmma)" in hopper and "dx + gb (sm90 TMA + wgmma)" in hopper
        assert not any("(CuTe thin)" in name and name.startswith("gb") for name in hopper)
        assert not any("sm90" in name for name in names(cost_model.GPUS[key], 4))
        plan = cost_model.provider_plan("cuda", 4096, 768, 2304, 33, 2, 0.1, sms=132, hopper=True)
        names_33 = [launch.kernel for launch in plan["backward"]]
        assert "dx (sm90 TMA + wgmma)" in names_33  # r = 33: the tall gb GEMM writes round(gb) first
        assert "gb + round(gb) (CuTe thin)" in names_33
    a100 = names(cost_model.GPUS["A100-SXM"], 2)
    assert "forward (CuTe sm80)" in a100 and "dx + gb (CuTe sm80)" in a100
    assert not any("sm90" in name for name in a100)


def test_sm90_fused_gb_rule_is_the_headers():
    """The model's sm90_dx_computes_gb is csrc/cuda_kernels.h's: the same constants, and the
    plan's dx is the fused one exactly where the rule says."""
    header = (Path(__file__).resolve().parents[1] / "csrc" / "cuda_kernels.h").read_text()

    def constant(name):
        match = re.search(rf"constexpr int64_t {name} = (\d+);", header)
        assert match, f"{name} not found in csrc/cuda_kernels.h"
        return int(match.group(1))

    assert constant("kSm90FusedGbMaxRank") == cost_model.SM90_FUSED_GB_MAX_RANK
    assert constant("kSm90FusedGbMaxColumnTiles") == cost_model.SM90_FUSED_GB_MAX_COLUMN_TILES
    for r, K, fused in [(16, 768, True), (32, 1024, True), (1, 1025, False), (16, 3072, False), (33, 768, False)]:
        assert cost_model.sm90_dx_computes_gb(r, K) == fused, (r, K)
        names = [launch.kernel for launch in cost_model.cuda_plan(4096, K, 768, r, 2, 0.0, hopper=True)["backward"]]
        assert ("dx + gb (sm90 TMA + wgmma)" in names) == fused, (r, K, names)
        assert ("gb + round(gb) (CuTe thin)" in names) == (not fused), (r, K, names)


def _sm90_backward_us(gpu, M, K, N, r, fused_gb):
    launches = cost_model._cuda_sm90_plan(M, K, N, r, 2, 0.0, fused_gb=fused_gb)["backward"]
    return cost_model.roofline_ms(launches, gpu, 2) * 1e3


@pytest.mark.parametrize("N", [768, 3072])
def test_sm90_fused_gb_switch_follows_the_cost_model(N):
    """The rule's K bound lies between the two Hoppers' modelled break-evens: every K it fuses
    is no loss on the H100 (3.35 TB/s), every K it does not fuse is a loss to fuse on the H200
    (4.8 TB/s); on both, the ViT-B shapes (M = 4096, r = 16) take the cheaper side, lin2
    (K = 3072, N = 768) the separate gb GEMM."""
    h100, h200 = cost_model.GPUS["H100-SXM"], cost_model.GPUS["H200"]
    for K in range(128, 4097, 128):
        fused = cost_model.sm90_dx_computes_gb(16, K)
        gpu = h100 if fused else h200
        fused_us, separate_us = (_sm90_backward_us(gpu, 4096, K, N, 16, side) for side in (True, False))
        assert (fused_us <= separate_us) == fused, (K, N, gpu.name, fused_us, separate_us)
    vit_b = {"qkv": (768, 2304), "proj": (768, 768), "lin1": (768, 3072), "lin2": (3072, 768)}
    for gpu in (h100, h200):
        for name, (K, n) in vit_b.items():
            fused_us, separate_us = (_sm90_backward_us(gpu, 4096, K, n, 16, side) for side in (True, False))
            assert cost_model.sm90_dx_computes_gb(16, K) == (fused_us < separate_us), (gpu.name, name)
    with pytest.raises(ValueError, match="32 ranks, not r = 33"):
        cost_model._cuda_sm90_plan(4096, 768, 768, 33, 2, 0.0, fused_gb=True)


@pytest.mark.parametrize("hopper", [False, True])
def test_cuda_plan_counts_the_keep_bits_of_the_16bit_backward(hopper):
    """With dropout, the fp16/bf16 dx writes the mask as keep bits (uint32 [M][ceil(K/32)],
    csrc/cuda_keep_bits.cuh) and dA reads them once per 32-rank tile; no bits without dropout or
    in fp32 (TF32: the dx writes none, dA hashes)."""
    M, K, N = 4096, 776, 2304  # K % 32 != 0: ceil(K/32) words per row

    def by_name(elt, p, r):
        plan = cost_model.cuda_plan(M, K, N, r, elt, p, hopper=hopper)
        return {launch.kernel: launch for launch in plan["backward"]}

    keep = M * 25 * 4
    assert cost_model.keep_bits_bytes(M, K, 0.1) == keep and cost_model.keep_bits_bytes(M, K, 0.0) == 0
    for r, rank_tiles in ((16, 1), (40, 2)):
        on, off = by_name(2, 0.1, r), by_name(2, 0.0, r)
        dx = next(name for name in on if name.startswith("dx"))
        assert on[dx].writes - off[dx].writes == keep
        assert on["dA partials (CuTe thin)"].reads - off["dA partials (CuTe thin)"].reads == keep * rank_tiles
    fp32_on, fp32_off = by_name(4, 0.1, 16), by_name(4, 0.0, 16)
    assert [(l.reads, l.writes) for l in fp32_on.values()] == [(l.reads, l.writes) for l in fp32_off.values()]
