#!/usr/bin/env bash
# One GPU-machine session: pcpp and DistriFusion on the same 4 GPUs, plus 2- and 3-GPU pcpp runs and the GPU
# tests. Results go to $OUT (JSON + logs). Needs the wheel folders .whl and .whl-df (scripts/fetch_device_wheels.sh).
# Usage on the GPU machine, from the repository root:  OUT=/some/dir bash benchmarks/device_run.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a results folder}
nvidia-smi -L | tee "$OUT/cards.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-df .whl-df/*.whl || exit 1
PCPP_PATH=$PWD/src:$PWD/tests:/tmp/site
run() { PYTHONPATH=$PCPP_PATH timeout -k 10 "$1" python3 -m torch.distributed.run --standalone --nproc-per-node "$2" \
  -m pcpp.bench "${@:3}"; }

# 1. pcpp on 4 GPUs (cfg 2 x patch 2) with the single-GPU baseline and the floor.
run 280 4 --resolutions 1024 2048 --modes single floor full partial:0.3 --single-variants graph \
  --deadline-s 270 --out "$OUT/pcpp_n4.json" > "$OUT/pcpp_n4.log" 2>&1
# 2. DistriFusion on the same GPUs (its own diffusers 0.24 stack).
for s in 1024 2048; do
  PYTHONPATH=/tmp/site-df timeout -k 10 60 python3 -m torch.distributed.run --standalone --nproc-per-node 4 \
    benchmarks/distrifusion_runner.py --height "$s" --width "$s" --deadline-s 55 --out "$OUT/df_n4_$s.json" \
    >> "$OUT/df_n4.log" 2>&1
done
# 3. CUDA graphs against eager over whole loops (NCCL, 2 and 4 GPUs).
PYTHONPATH=$PCPP_PATH timeout -k 5 70 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_gpu.py \
  > "$OUT/gpu_tests.log" 2>&1
# 4. 2 GPUs (pure CFG split) and 3 GPUs (patch 3), single-GPU numbers reused from step 1 (same machine).
run 60 2 --resolutions 2048 --modes partial:0.3 --single-from "$OUT/pcpp_n4.json" --deadline-s 55 \
  --out "$OUT/pcpp_n2.json" > "$OUT/pcpp_n2.log" 2>&1
run 70 3 --resolutions 1024 --modes floor full partial:0.3 --single-from "$OUT/pcpp_n4.json" --deadline-s 65 \
  --out "$OUT/pcpp_n3.json" > "$OUT/pcpp_n3.log" 2>&1
tail -n 25 "$OUT"/pcpp_n4.log "$OUT"/gpu_tests.log; grep -h "median" "$OUT"/df_n4.log
