#!/usr/bin/env bash
# One part of the GPU benchmark session (4 GPUs); each part fits one 10-minute call. Results (JSON) go to
# $OUT/r and are packed into $OUT/results.tgz at the end; the log to $OUT/log.txt.
# Needs the wheel folders .whl and .whl-df (scripts/fetch_device_wheels.sh). From the repository root:
#   OUT=/some/dir bash benchmarks/device_run.sh graph     # DistriFusion, single GPU, floors, pcpp full + partial 0.3
#   OUT=/some/dir bash benchmarks/device_run.sh small     # paired fidelity, 2 GPUs (CFG split), 3 GPUs, 1 GPU
#   OUT=/some/dir bash benchmarks/device_run.sh compile   # torch.compile: DistriFusion again, pcpp, single GPU
#   OUT=/some/dir bash benchmarks/device_run.sh tests     # tests/test_gpu.py on NCCL, the compiled case included
# docs/benchmarks.md says which part produced which number. Parts are independent; compare numbers only
# within one machine (one lease).
set -uo pipefail
PART=${1:?which part: graph, small, compile or tests}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a results folder}
L=$OUT/log.txt; R=$OUT/r; mkdir -p "$R"
finish() { tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$R"; }
trap finish EXIT
nvidia-smi -L | tee "$L"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-df .whl-df/*.whl || exit 1
P=$PWD/src:$PWD/tests:/tmp/site
# Every command gets at most its own limit and never runs past 580 s into the part.
cap() { local t=$1 left=$((580 - SECONDS)); [ "$left" -lt "$t" ] && t=$left; echo "$t"; }
bench() { local t; t=$(cap "$1"); [ "$t" -le 5 ] && return; PYTHONPATH=$P timeout -k 5 "$t" \
  python3 -m torch.distributed.run --standalone --nproc-per-node "$2" -m pcpp.bench "${@:3}" >> "$L" 2>&1; }
distrifusion() { local t; t=$(cap "$1"); [ "$t" -le 5 ] && return; PYTHONPATH=/tmp/site-df timeout -k 5 "$t" \
  python3 -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/distrifusion_runner.py \
  --height "$2" --width "$2" --repeats 2 --deadline-s $(($t - 5)) "${@:3}" --out "$R/df_n4_$2.json" >> "$L" 2>&1; }
mark() { echo "== $1 done at $SECONDS s" >> "$L"; }

case $PART in
graph)
  distrifusion 80 1024; distrifusion 80 2048; distrifusion 95 3072; mark distrifusion
  bench 200 4 --resolutions 1024 2048 --modes single floor full partial:0.3 --single-variants graph --repeats 2 \
    --deadline-s 195 --out "$R/pcpp_n4.json"; mark n4
  bench 190 4 --resolutions 3072 --modes single floor full partial:0.3 --single-variants graph --repeats 1 \
    --no-fidelity --deadline-s 185 --out "$R/pcpp_n4_3072.json"; mark n4_3072
  ;;
small)
  # DistriFusion's own random weights, so that its fidelity and pcpp's pair up; pcpp then runs 5 synchronous
  # steps, as many as DistriFusion's warmup_steps=4 gives.
  distrifusion 80 1024 --save-weights /tmp/w.pt; mark distrifusion
  bench 100 4 --resolutions 1024 2048 --modes full partial:0.3 --warmup-steps 5 --weights /tmp/w.pt --repeats 1 \
    --deadline-s 95 --out "$R/pcpp_n4_paired.json"; mark paired
  bench 80 2 --resolutions 2048 --modes single partial:0.3 --single-variants graph --no-fidelity --repeats 2 \
    --deadline-s 75 --out "$R/pcpp_n2.json"; mark n2
  bench 90 3 --resolutions 1024 --modes single floor full partial:0.3 --single-variants graph --repeats 2 \
    --deadline-s 85 --out "$R/pcpp_n3.json"; mark n3
  bench 60 1 --resolutions 1024 --modes single partial:0.3 --single-variants eager graph --no-fidelity --repeats 2 \
    --deadline-s 55 --out "$R/pcpp_n1.json"; mark n1
  ;;
compile)
  distrifusion 75 1024; distrifusion 75 2048; distrifusion 90 3072; mark distrifusion
  bench 260 4 --resolutions 1024 2048 3072 --modes partial:0.3 --compile-only --no-fidelity --repeats 2 \
    --deadline-s 250 --out "$R/pcpp_n4_compile.json"; mark n4_compile
  bench 170 1 --resolutions 1024 --modes single partial:0.3 --compile --no-fidelity --repeats 2 --deadline-s 160 \
    --out "$R/pcpp_n1_compile.json"; mark n1
  ;;
tests)
  PYTHONPATH=$P timeout -k 5 570 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >> "$L" 2>&1; mark tests
  ;;
*) echo "unknown part $PART (graph, small, compile, tests)"; exit 2 ;;
esac
grep -h "| .*x.* |\|DistriFusion 4\|== " "$L" | tail -40
