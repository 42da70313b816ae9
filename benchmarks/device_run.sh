#!/usr/bin/env bash
# One part of the GPU benchmark session (4 GPUs); each part fits one 10-minute call. Results (JSON) go to
# $OUT/r and are packed into $OUT/results.tgz at the end; the log to $OUT/log.txt.
# Needs the wheel folders .whl and .whl-df (scripts/fetch_device_wheels.sh). From the repository root:
#   OUT=/some/dir bash benchmarks/device_run.sh graph     # DistriFusion, single GPU, floors, pcpp full + partial 0.3
#   OUT=/some/dir bash benchmarks/device_run.sh small     # paired fidelity, 2 GPUs (CFG split), 3 GPUs, 1 GPU
#   OUT=/some/dir bash benchmarks/device_run.sh compile   # torch.compile: DistriFusion again, pcpp partial 0.3 (1024)
#   OUT=/some/dir bash benchmarks/device_run.sh carveout  # compile at 1024 as above, then with 8 SMs kept from matmuls
#   OUT=/some/dir bash benchmarks/device_run.sh c2048     # the same at 2048 (then c3072), on the same machine
#   OUT=/some/dir bash benchmarks/device_run.sh profile   # where compiled pcpp's time goes at 1024 (torch.profiler)
#   OUT=/some/dir bash benchmarks/device_run.sh profile3072  # the same at 3072, beside the compiled floor
#   OUT=/some/dir bash benchmarks/device_run.sh patch2    # 2 GPUs, patch 2 alone: compiled floor and pcpp, profiled
#   OUT=/some/dir bash benchmarks/device_run.sh patch2df  # 2 GPUs, patch 2 alone: DistriFusion, pcpp, fused, carveout
#   OUT=/some/dir bash benchmarks/device_run.sh transport # 2+ GPUs: NCCL against copy-engine transfers, emulated step
#   OUT=/some/dir bash benchmarks/device_run.sh knobs     # compile at 1024 as above, then with NCCL p2p channels capped
#   OUT=/some/dir bash benchmarks/device_run.sh one       # 1 GPU alone: single eager/graph/compile against pcpp on 1 rank
#   OUT=/some/dir bash benchmarks/device_run.sh one2      # 1 GPU: plain UNet and pcpp on 1 rank, images interleaved
#   OUT=/some/dir bash benchmarks/device_run.sh onegpu    # 1 GPU: tests/test_gpu_one.py and the GPU kernel tests, then one2
#   OUT=/some/dir bash benchmarks/device_run.sh cfg2      # 2 GPUs (CFG split, 2048) against the best single path,
#                                                         # all compiled; beside it the compiled GPU test
#   OUT=/some/dir bash benchmarks/device_run.sh tests     # tests/test_gpu.py on NCCL, the compiled case included
#   OUT=/some/dir bash benchmarks/device_run.sh best      # 2 GPUs (CFG split, 2048) and 1 GPU (1024) against the best
#                                                         # single path, compile included; then tests/test_gpu.py
#   OUT=/some/dir bash benchmarks/device_run.sh vae       # 1 GPU: the VAE decode floor (eager), then whole images
#                                                         # at 1024 and 2048 (text, loop, decode; VAE parallel/whole)
#   OUT=/some/dir bash benchmarks/device_run.sh vaec      # 1 GPU: the decode floor compiled, fp16 (vaec32: fp32)
# docs/benchmarks.md says which part produced which number. Parts are independent; compare numbers only
# within one machine (one lease).
set -uo pipefail
PART=${1:?which part: graph, small, compile, patch2, patch2df, transport, knobs, carveout, c2048, c3072, profile, profile3072, one, one2, onegpu, vae, vaec, vaec32, best, cfg2 or tests}
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
# The same on the GPUs listed first, logged to its own file (for runs side by side on disjoint GPUs).
bench_on() { local gpus=$1 log=$2 t; t=$(cap "$3"); [ "$t" -le 5 ] && return; CUDA_VISIBLE_DEVICES=$gpus \
  PYTHONPATH=$P timeout -k 5 "$t" python3 -m torch.distributed.run --standalone --nproc-per-node "$4" \
  -m pcpp.bench "${@:5}" > "$log" 2>&1; }
distrifusion() { local t; t=$(cap "$1"); [ "$t" -le 5 ] && return; PYTHONPATH=/tmp/site-df timeout -k 5 "$t" \
  python3 -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-4}" benchmarks/distrifusion_runner.py \
  --height "$2" --width "$2" --repeats 2 --deadline-s $(($t - 5)) "${@:3}" \
  --out "$R/df_n${NPROC:-4}_$2${DF_TAG:-}.json" \
  >> "$L" 2>&1; }
# DistriFusion once more after pcpp (report df_n4_<size>_after.json): a GPU that slows as it heats (1.9% over three
# minutes on one H100, docs/benchmarks.md table 9) would otherwise favour whichever ran first.
distrifusion_after() { DF_TAG=_after distrifusion "$@"; mark distrifusion_after; }
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
  # torch.compile headline, one resolution per part (c2048 and c3072 right after, on the same machine while it is
  # still held): compiling the SDXL layout took 100-156 s per resolution on H100s.
  distrifusion 75 1024; mark distrifusion
  bench 300 4 --resolutions 1024 --modes partial:0.3 --compile-only --repeats 2 --deadline-s 290 \
    --out "$R/pcpp_n4_compile_1024.json"; mark n4_compile_1024
  distrifusion_after 75 1024
  ;;
knobs)
  # The compile headline at 1024 with NCCL's point-to-point channels capped: spinning NCCL kernels share SMs with
  # the GEMMs. The later runs reuse the first one's Inductor cache on this machine, so they compile faster.
  distrifusion 75 1024; mark distrifusion
  bench 250 4 --resolutions 1024 --modes partial:0.3 --compile-only --repeats 3 --deadline-s 240 \
    --out "$R/pcpp_n4_compile_1024.json"; mark n4_compile_1024
  NCCL_MAX_P2P_NCHANNELS=1 NCCL_NCHANNELS_PER_PEER=1 bench 120 4 --resolutions 1024 --modes partial:0.3 \
    --compile-only --no-fidelity --repeats 3 --deadline-s 110 --out "$R/pcpp_n4_compile_1024_p2p1.json"; mark p2p1
  NCCL_MAX_P2P_NCHANNELS=4 bench 120 4 --resolutions 1024 --modes partial:0.3 \
    --compile-only --no-fidelity --repeats 3 --deadline-s 110 --out "$R/pcpp_n4_compile_1024_p2p4.json"; mark p2p4
  ;;
carveout)
  # The compile headline at 1024 with cuBLASLt matmuls kept off 8 SMs (--sm-carveout): identical GEMMs ran 4-8%
  # longer in pcpp than in the floor (docs/benchmarks.md table 7); do NCCL's kernels, holding SMs, hold them up?
  # TORCH_BLAS_PREFER_CUBLASLT=1 sends every matmul through cuBLASLt, where the carveout applies.
  distrifusion 75 1024; mark distrifusion
  bench 250 4 --resolutions 1024 --modes partial:0.3 --compile-only --repeats 3 --deadline-s 240 \
    --out "$R/pcpp_n4_compile_1024.json"; mark n4_compile_1024
  bench 90 4 --resolutions 1024 --modes partial:0.3 --compile-only --no-fidelity --repeats 3 --sm-carveout 8 \
    --deadline-s 85 --out "$R/pcpp_n4_compile_1024_carve8.json"; mark carve8
  TORCH_BLAS_PREFER_CUBLASLT=1 bench 90 4 --resolutions 1024 --modes partial:0.3 --compile-only --no-fidelity \
    --repeats 3 --sm-carveout 8 --deadline-s 85 --out "$R/pcpp_n4_compile_1024_carve8_lt.json"; mark carve8_lt
  distrifusion_after 75 1024
  ;;
profile3072)
  # Where the time goes at 3072, the size furthest from 1.4x (table 8): the compiled floor and compiled pcpp, one
  # profiled image each (kernel tables in r/prof).
  bench 570 4 --resolutions 3072 --modes floor partial:0.3 --compile-floor --compile-only --no-fidelity \
    --repeats 1 --profile "$R/prof" --deadline-s 560 --out "$R/pcpp_n4_profile_3072.json"; mark n4_profile_3072
  ;;
patch2)
  # 2 GPUs, image split only (patch 2, batch 2 per rank): the 4-GPU headline's strips at twice the batch, for when
  # only 2-GPU machines are lent. Compiled floor and compiled pcpp, both profiled (kernel tables in r/prof).
  bench 560 2 --no-cfg-split --resolutions 1024 --modes floor partial:0.3 --compile-floor --compile-only \
    --no-fidelity --repeats 2 --profile "$R/prof" --deadline-s 550 --out "$R/pcpp_n2p_profile_1024.json"
  mark n2p_profile_1024
  ;;
patch2df)
  # The same split against DistriFusion (split_batch=False): pcpp as it is, with diffusers' fused projections
  # (--fuse-qkv), and fused with 8 SMs kept from matmuls (the fused run's Inductor cache makes it compile faster).
  NPROC=2 distrifusion 80 1024 --no-split-batch; mark distrifusion
  bench 200 2 --no-cfg-split --resolutions 1024 --modes partial:0.3 --compile-only --repeats 2 --deadline-s 195 \
    --out "$R/pcpp_n2p_compile_1024.json"; mark n2p_compile_1024
  bench 200 2 --no-cfg-split --resolutions 1024 --modes partial:0.3 --compile-only --repeats 2 --fuse-qkv \
    --deadline-s 195 --out "$R/pcpp_n2p_compile_1024_fused.json"; mark n2p_compile_1024_fused
  bench 90 2 --no-cfg-split --resolutions 1024 --modes partial:0.3 --compile-only --no-fidelity --repeats 2 \
    --fuse-qkv --sm-carveout 8 --deadline-s 85 --out "$R/pcpp_n2p_compile_1024_fused_carve8.json"; mark carve8
  ;;
transport)
  # Whether copy-engine transfers into symmetric memory spare the compute that NCCL's kernels slow down: an
  # emulated step of 156 layers (benchmarks/diag/transport.py), on all the GPUs of the machine.
  PYTHONPATH=$P OUT=$R timeout -k 5 "$(cap 300)" python3 -m torch.distributed.run --standalone \
    --nproc-per-node "$(nvidia-smi -L | wc -l)" benchmarks/diag/transport.py >> "$L" 2>&1; mark transport
  ;;
c2048)
  distrifusion 80 2048; mark distrifusion
  bench 320 4 --resolutions 2048 --modes partial:0.3 --compile-only --repeats 2 --deadline-s 310 \
    --out "$R/pcpp_n4_compile_2048.json"; mark n4_compile_2048
  distrifusion_after 80 2048
  ;;
c3072)
  distrifusion 95 3072; mark distrifusion
  bench 340 4 --resolutions 3072 --modes partial:0.3 --compile-only --no-fidelity --repeats 2 --deadline-s 330 \
    --out "$R/pcpp_n4_compile_3072.json"; mark n4_compile_3072
  distrifusion_after 95 3072
  ;;
best)
  # Runs side by side on disjoint GPUs (an NVSwitch host: no shared links; 64 host cores): 2 GPUs on 0-1; 1 GPU on
  # 2, then the compiled GPU test on 2-3; at the end the other GPU tests on all four.
  bench_on 0,1 "$OUT/n2.txt" 340 2 --resolutions 2048 --modes single floor partial:0.3 --single-variants graph \
    --compile --compile-floor --no-fidelity --repeats 2 --deadline-s 330 --out "$R/pcpp_n2_compile.json" &
  { bench_on 2 "$OUT/n1.txt" 240 1 --resolutions 1024 --modes single partial:0.3 --single-variants eager graph \
      --compile --no-fidelity --repeats 2 --deadline-s 230 --out "$R/pcpp_n1_compile.json"
    CUDA_VISIBLE_DEVICES=2,3 PYTHONPATH=$P timeout -k 5 "$(cap 300)" python3 -m pytest -q -p no:cacheprovider \
      -m slow tests/test_gpu.py > "$OUT/t1.txt" 2>&1; }
  wait; cat "$OUT/n2.txt" "$OUT/n1.txt" "$OUT/t1.txt" >> "$L"; rm -f "$OUT"/n2.txt "$OUT"/n1.txt "$OUT"/t1.txt
  mark n2_n1_slowtest
  PYTHONPATH=$P timeout -k 5 "$(cap 150)" python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_gpu.py \
    >> "$L" 2>&1; mark tests
  ;;
profile)
  # Where the compiled run's time goes: pcpp partial 0.3 at 1024, one profiled image (kernel tables in r/prof,
  # device time per step by kind of kernel in the report). Its compiled floor, profiled the same way, takes
  # another 210 s: add `floor --compile-floor` to --modes for it.
  bench 330 4 --resolutions 1024 --modes partial:0.3 --compile-only --no-fidelity --repeats 2 --profile "$R/prof" \
    --deadline-s 320 --out "$R/pcpp_n4_profile.json"; mark n4_profile
  # Inductor's generated code for the converted UNet (which kernels surround pcpp's operators).
  grep -rl "torch.ops.pcpp" /tmp/torchinductor_* --include=*.py 2>/dev/null | head -2 | while read -r f; do
    cp "$f" "$R/"; done
  ;;
one)
  # 1 GPU alone on its machine (a 1-GPU kind will do): every single-GPU path against pcpp on one rank.
  bench 330 1 --resolutions 1024 --modes single partial:0.3 --single-variants eager graph --compile --no-fidelity \
    --repeats 3 --deadline-s 320 --out "$R/pcpp_n1_alone.json"; mark n1_alone
  ;;
vae)
  # 1 GPU: the floor of the parallel decode: SDXL's VAE decoding the whole latent against rank 0's strip of 2 and 4
  # (its rows and the halo row its first convolution reads), fp16 and fp32 (fp32 4096 whole, about 75 GiB, skipped
  # by --max-gib), and the VAE converted by pcpp on one rank beside the plain one, decodes interleaved. About 4 min.
  bench 330 1 --vae-floor --resolutions 2048 3072 4096 --strips 1 2 4 --vae-dtypes float16 float32 --vae-converted \
    --repeats 3 --deadline-s 320 --out "$R/vae_floor.json"; mark vae_floor
  # Whole images through StableDiffusionXLPipeline (random text encoders, UNet and VAE): text encoding, the 50-step
  # loop and the decode (fp32: SDXL's force_upcast) apart, with the VAE converted (parallel) and whole.
  bench 240 1 --whole-image --resolutions 1024 2048 --modes partial:0.3 --vae-placements parallel whole \
    --repeats 1 --deadline-s 230 --out "$R/whole_image_n1.json"; mark whole_image
  ;;
vaec|vaec32)
  # The same floor under torch.compile (inductor, dynamic=False: one compilation per shape, plain and converted),
  # one dtype per part; rows are written as they finish, so a run cut short keeps what it measured.
  DT=float16; [ "$PART" = vaec32 ] && DT=float32
  bench 560 1 --vae-floor --resolutions 2048 3072 4096 --strips 1 2 4 --vae-dtypes "$DT" --vae-converted \
    --compile-only --repeats 3 --deadline-s 550 --out "$R/vae_floor_compile_$DT.json"; mark "vae_floor_compile_$DT"
  ;;
one2)
  # 1 GPU: the plain UNet and pcpp on one rank, both on the GPU at once, timed images interleaved (A B B A ...).
  PYTHONPATH=$P timeout -k 5 "$(cap 450)" python3 benchmarks/one_gpu_interleaved.py --resolution 1024 \
    --variants graph compile+graph --pairs 3 --out "$R/one_gpu_interleaved_1024.json" >> "$L" 2>&1; mark one2
  ;;
cfg2)
  bench_on 0,1 "$OUT/n2.txt" 330 2 --resolutions 2048 --modes single partial:0.3 --single-variants graph --compile-only \
    --compile --no-fidelity --repeats 2 --deadline-s 320 --out "$R/pcpp_n2_compile.json" &
  CUDA_VISIBLE_DEVICES=2,3 PYTHONPATH=$P timeout -k 5 "$(cap 330)" python3 -m pytest -q -p no:cacheprovider \
    -m slow tests/test_gpu.py > "$OUT/t1.txt" 2>&1
  wait; cat "$OUT/n2.txt" "$OUT/t1.txt" >> "$L"; rm -f "$OUT"/n2.txt "$OUT"/t1.txt; mark cfg2_slowtest
  ;;
onegpu)
  # 1 GPU: the GPU tests one card can run, then the plain UNet and pcpp on one rank interleaved (as one2).
  PYTHONPATH=$P timeout -k 5 "$(cap 300)" python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_one.py \
    tests/test_kernels.py tests/test_gpu.py >> "$L" 2>&1; mark onegpu_tests
  PYTHONPATH=$P timeout -k 5 "$(cap 450)" python3 benchmarks/one_gpu_interleaved.py --resolution 1024 \
    --variants graph compile+graph --pairs 2 --out "$R/one_gpu_interleaved_1024.json" >> "$L" 2>&1; mark one2
  ;;
tests)
  PYTHONPATH=$P timeout -k 5 570 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >> "$L" 2>&1; mark tests
  ;;
*) echo "unknown part $PART (graph, small, compile, patch2, patch2df, transport, knobs, carveout, c2048, c3072, profile, profile3072, one, one2, onegpu, vae, vaec, vaec32, best, cfg2, tests)"; exit 2 ;;
esac
grep -h "| .*x.* |\|DistriFusion 4\|== " "$L" | tail -40
