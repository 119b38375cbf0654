"""The TTGIR checks of tests/test_triton_gpu_kept_configs.py on hand-written loops: each verdict can fail."""

from __future__ import annotations

from test_triton_gpu_kept_configs import SPILL, loops_feeding_mmas, pipeline_problems

PIPELINED_SM90 = """\
    %0 = scf.for %i = %c0 to %K step %c64 iter_args(%acc = %cst) -> (tensor<128x128xf32, #mma>) {
      %1 = ttg.async_wait %a, %b {num = 2 : i32}
      %2 = ttng.warp_group_dot %x, %w, %acc {isAsync = true} : !ttg.memdesc<128x64xbf16> * !ttg.memdesc<64x128xbf16>
      %3:3 = ttng.warp_group_dot_wait %2, %x, %w {pendings = 1 : i32}
      %4 = ttg.async_copy_global_to_local %ptrs, %buf mask %m : tensor<128x64x!tt.ptr<bf16>>
      scf.yield %3#0 : tensor<128x128xf32, #mma>
    }
    %5 = ttng.warp_group_dot_wait %0 {pendings = 0 : i32}
"""

DRAINED_SM90 = PIPELINED_SM90.replace("{pendings = 1 : i32}", "{pendings = 0 : i32}")

SYNCHRONOUS_SM80 = """\
    %0 = scf.for %i = %c0 to %K step %c64 iter_args(%acc = %cst) -> (tensor<64x16xf32, #mma>) {
      %t = tt.load %ptrs, %mask, %other : tensor<64x16x!tt.ptr<bf16>, #blocked>
      %4 = ttg.async_copy_global_to_local %ptrs2, %buf mask %m : tensor<64x64x!tt.ptr<bf16>>
      %2 = tt.dot %a, %b, %acc : tensor<64x64xbf16> * tensor<64x16xbf16> -> tensor<64x16xf32, #mma>
      scf.yield %2 : tensor<64x16xf32, #mma>
    }
    %1 = scf.for %j = %c0 to %M step %c1 iter_args(%s = %z) -> (i32) {
      %q = arith.addi %s, %j : i32
      scf.yield %q : i32
    }
"""


NESTED_SM90 = """\
    %0 = scf.for %m = %c0 to %rows step %c128 iter_args(%dA = %cst) -> (tensor<16x128xf32, #mma>) {
      %x = tt.load %xptrs, %mask, %other : tensor<128x128x!tt.ptr<bf16>, #blocked>
      %d = ttng.warp_group_dot %gb, %xs, %dA : !ttg.memdesc<16x128xbf16> * !ttg.memdesc<128x128xbf16>
      %w = ttng.warp_group_dot_wait %d {pendings = 0 : i32}
""" + "\n".join("  " + line for line in PIPELINED_SM90.splitlines()) + """
      scf.yield %w : tensor<16x128xf32, #mma>
    }
"""


def test_a_pipelined_loop_passes():
    loops = loops_feeding_mmas(PIPELINED_SM90)
    assert len(loops) == 1
    assert pipeline_problems(loops[0], 90) == []


def test_a_loop_waiting_for_every_wgmma_is_drained():
    problems = pipeline_problems(loops_feeding_mmas(DRAINED_SM90)[0], 90)
    assert any("pendings = 0" in p for p in problems)


def test_a_synchronous_tile_load_is_reported_and_loops_without_mma_are_skipped():
    loops = loops_feeding_mmas(SYNCHRONOUS_SM80)
    assert len(loops) == 1
    problems = pipeline_problems(loops[0], 80)
    assert any("synchronous tile load" in p for p in problems)
    no_async = [line for line in loops[0] if "async_copy" not in line]
    assert any("no asynchronous copy" in p for p in pipeline_problems(no_async, 80))


def test_ptxas_spill_report_is_parsed():
    log = "ptxas info    : Used 168 registers, 8 bytes spill stores, 12 bytes spill loads\n"
    assert [(int(a), int(b)) for a, b in SPILL.findall(log)] == [(8, 12)]


def test_only_innermost_loops_are_main_loops():
    # The backward's walk over a row group's row blocks issues the dA product once per row block, from a
    # synchronously loaded x tile: an epilogue, not a main loop. The loop inside it is checked.
    loops = loops_feeding_mmas(NESTED_SM90)
    assert len(loops) == 1
    assert pipeline_problems(loops[0], 90) == []
    inner_drained = NESTED_SM90.replace("{pendings = 1 : i32}", "{pendings = 0 : i32}")
    assert any("pendings = 0" in p for p in pipeline_problems(loops_feeding_mmas(inner_drained)[0], 90))
