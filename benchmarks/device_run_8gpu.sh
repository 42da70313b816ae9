#!/usr/bin/env bash
# The 8-GPU session of issue 5 (not yet run: no 8-GPU machine has been lent). pcpp (partial 0.3 and full
# conditioning) and DistriFusion on the same 8 GPUs, cfg 2 x patch 4 and patch 8, at 1024, 2048 and 3840, with the
# single-GPU baseline. Results go to $OUT. Needs .whl and .whl-df (scripts/fetch_device_wheels.sh).
# Usage on the GPU machine, from the repository root:  OUT=/some/dir bash benchmarks/device_run_8gpu.sh [SIZES]
# Time: about 20 minutes for all three sizes on H200 (3840 dominates); pass "1024 2048" to stay within 10.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a results folder}
SIZES=${1:-1024 2048 3840}
nvidia-smi -L | tee "$OUT/cards.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-df .whl-df/*.whl || exit 1
bench() { PYTHONPATH=$PWD/src:/tmp/site python3 -m torch.distributed.run --standalone --nproc-per-node 8 -m pcpp.bench "$@"; }
df() { PYTHONPATH=/tmp/site-df python3 -m torch.distributed.run --standalone --nproc-per-node 8 \
  benchmarks/distrifusion_runner.py "$@"; }
for s in $SIZES; do
  # cfg 2 x patch 4 (pcpp's default layout on an even world; DistriFusion's split_batch=True)
  bench --resolutions "$s" --modes single floor full partial:0.3 --single-variants graph \
    --out "$OUT/pcpp_n8_cfg_$s.json" > "$OUT/pcpp_n8_cfg_$s.log" 2>&1
  df --height "$s" --width "$s" --out "$OUT/df_n8_cfg_$s.json" >> "$OUT/df_n8.log" 2>&1
  # patch 8, both CFG halves on every rank
  bench --resolutions "$s" --modes floor full partial:0.3 --no-cfg-split --single-from "$OUT/pcpp_n8_cfg_$s.json" \
    --out "$OUT/pcpp_n8_patch_$s.json" > "$OUT/pcpp_n8_patch_$s.log" 2>&1
  df --height "$s" --width "$s" --no-split-batch --out "$OUT/df_n8_patch_$s.json" >> "$OUT/df_n8.log" 2>&1
done
grep -h "| [0-9]*x[0-9]* |" "$OUT"/pcpp_n8_*.log; grep -h "median" "$OUT/df_n8.log"
