#!/usr/bin/env bash
# Regenerates every committed CPU table of the AMD EPYC 2-core machine: the layer benchmark
# at 1 and 2 threads, fp32 and bf16, into benchmarks/results/cpu-amd-epyc-{1t,2t}[/bf16].
# Run from anywhere on an idle machine (each run stamps its load average; nothing else
# should be compiling or testing). Takes ~15 minutes. The READMEs' prose and the top-level
# README's CPU table quote these files' geometric means: update them from the new layer.md
# summaries afterwards.
#
#   bash benchmarks/results/run_cpu_tables.sh            # uses .venv/bin/python
#   PYTHON=/path/to/python bash benchmarks/results/run_cpu_tables.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
COMMON=(--device cpu --layouts global,windowed --dropout 0,0.1 --modes full --providers linear,peft,addmm,cuda)

for threads in 1 2; do
  out="benchmarks/results/cpu-amd-epyc-${threads}t"
  echo "== ${threads} thread(s), fp32 -> ${out} (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$PYTHON" benchmarks/bench_layer.py "${COMMON[@]}" --threads "$threads" --rep-ms 1500 --out "$out"
  echo "== ${threads} thread(s), bf16 -> ${out}/bf16 (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$PYTHON" benchmarks/bench_layer.py "${COMMON[@]}" --threads "$threads" --dtypes bf16 --rep-ms 1000 --out "$out/bf16"
done
