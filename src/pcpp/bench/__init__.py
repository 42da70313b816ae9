"""End-to-end benchmark of pcpp on a diffusers UNet: time, fidelity, traffic and memory, against one GPU.

Run one process per GPU under ``torchrun`` (it also runs on CPU ranks over gloo for tests)::

    torchrun --standalone --nproc-per-node 4 -m pcpp.bench --resolutions 1024 2048 \\
        --modes single floor full partial:0.3 --out results/pcpp_n4.json

The UNet is built from a diffusers config JSON with seeded random weights (no checkpoint, no text encoders, no
VAE) and driven by the SDXL pipeline's denoising loop: classifier-free guidance batch of 2 ``[uncond, cond]``,
guidance scale 5, DDIM with SDXL-base's scheduler settings, eta 0. The timing methodology mirrors the DistriFusion
baseline runner (``benchmarks/distrifusion_runner.py``), which shares :mod:`pcpp.bench.common` with it, so that the
two JSON reports compare directly.

Modes (``--modes``):

* ``single``: the best single-GPU path, on rank 0 only (the other ranks wait at a bounded barrier): the plain
  diffusers UNet at batch 2 on the whole latent, eagerly and under :class:`pcpp.cuda_graph.CUDAGraphUNet`, and with
  ``--compile`` also ``torch.compile`` under the graph wrapper. Every variant is reported; speedups use the best.
* ``floor``: what each rank computes when communication is free: the plain UNet on this rank's strip alone (batch
  1 with the CFG split, else 2), its self-attention keys and values widened to the token count the measured pcpp
  mode reads (synchronous steps: every strip; asynchronous ``partial:p`` steps: ``ceil(p * rows)`` rows of each
  adjacent strip; ``full``/``exact``: every strip). All ranks run at once, without communication; the report
  gives the slowest rank. One floor is measured per pcpp mode in ``--modes`` (``--floor-modes`` overrides).
* ``exact``, ``full``, ``partial:P``: :func:`pcpp.convert` with the mesh, ``warmup_steps``, ``exact=True``
  (``exact``), ``Conditioning.FULL`` (``full``, DistriFusion's attention) or ``partial=P``, and
  ``detect_new_image=False`` (each image starts with an explicit reset); run under ``CUDAGraphUNet`` unless
  ``--no-cuda-graph``, and with ``--compile`` also ``torch.compile(unet, dynamic=False)`` under it.

For every mode and variant: one untimed warm-up image (``--warmup-images``), then ``--repeats`` timed images.
The clock covers the whole denoising loop of one image (``--steps`` UNet calls, CFG combines and DDIM steps)
between two ``torch.cuda.synchronize()`` calls; ranks line up on a tiny all-reduce before each image. Text
encoders and the VAE are not part of the run and not timed.

Fidelity (pcpp modes): one extra untimed image after the timed ones records, at each step, the latent x_t and
the batch-2 noise prediction pcpp returned. After :func:`pcpp.revert`, the plain UNet (batch 2, whole latent, same
weights and conditioning) is evaluated on the same x_t and t, the steps shared out over the ranks, and the report
gives the relative L2 error ``||eps_pcpp - eps_ref|| / ||eps_ref||`` per step, raw and CFG-combined, with mean,
median and max over the steps after warmup. Final latents are not compared: with random weights any approximate
method's trajectory diverges from the single-GPU one, so only the per-step error is meaningful.

Traffic (pcpp modes): bytes sent and received per step by this rank, per layer kind, from
:func:`pcpp.comm_stats`, for one synchronous and one asynchronous step of the warm-up image. Only steps that run
the UNet's Python code are recorded (eager steps and CUDA-graph captures; replays are not), which is why the
warm-up image is used. Peak memory: ``torch.cuda.max_memory_allocated`` per rank, reset before each variant.

Step times: each timed image's steps are timed by CUDA events recorded between them (no host synchronisation);
the report gives each step's median over the timed images and, for pcpp and the floor, the mean of the
synchronous steps, the first asynchronous step and the median of the later ones, per rank.

Profile (``--profile DIR``): after the timed images of each variant, one more image runs under
``torch.profiler``; each rank writes its 60 busiest kernels (CPU operators on CPU ranks) to
``DIR/<label>.rank<r>.txt``, and the report gives device time and kernel count per step by kind of kernel (NCCL,
Triton, attention, conv, GEMM, copies, other): where a compiled run loses time against its floor.

Tuning experiments: ``--exchange-batch N`` posts the asynchronous exchanges of N layers together
(``PCPPConfig.exchange_batch``); ``--sm-carveout N`` keeps cuBLASLt matmuls off N SMs during pcpp's runs. The
report records both, and every ``NCCL_*``, ``TORCH_NCCL_*`` and ``TORCH_BLAS_*`` variable that was set.

Model build: ``torch.manual_seed(seed)``, then ``UNet2DConditionModel.from_config`` in fp32 directly on the rank's
GPU (``--init-device device``, seconds; identical on identical cards, checked with a weight checksum gathered from
every rank) or on the CPU (``--init-device cpu``, about a minute for SDXL, the same bits on any card), then a cast
to ``--dtype``.

Every wait is bounded: process groups get ``--pg-timeout-s``, rank 0's single-GPU runs are awaited on a gloo
barrier bounded by ``--deadline-s``, :mod:`faulthandler` ends the process at ``--deadline-s`` (collectives inside
CUDA graphs escape the NCCL watchdog), captured graphs are released before the process group is destroyed, that
destruction runs in a thread abandoned after ``--teardown-timeout-s``, and ``python -m pcpp.bench`` ends with
``os._exit``. The JSON report is rewritten after each finished mode, so a run cut short keeps what it measured.

Modules: :mod:`~pcpp.bench.arguments` (command line), :mod:`~pcpp.bench.layout` (process group and mesh),
:mod:`~pcpp.bench.model` (the UNet and scheduler), :mod:`~pcpp.bench.denoisers` (eager, CUDA-graph and compiled
wrappers), :mod:`~pcpp.bench.loop` (timing loop), :mod:`~pcpp.bench.profile`, :mod:`~pcpp.bench.single`,
:mod:`~pcpp.bench.floor` and :mod:`~pcpp.bench.floor_attention`, :mod:`~pcpp.bench.pcpp_modes` (the converted UNet,
traffic, fidelity), :mod:`~pcpp.bench.report`, :mod:`~pcpp.bench.run` (the driver), :mod:`~pcpp.bench.command`
(``main``), and :mod:`~pcpp.bench.common` and :mod:`~pcpp.bench.fidelity`: what the DistriFusion runner shares
with the bench (torch only; the runner loads them by file path, since it runs beside diffusers 0.24 and cannot
import pcpp). The default UNet config
(SDXL-base's) ships in ``pcpp/bench/configs/``.
"""

from __future__ import annotations

from .arguments import build_parser
from .command import main

__all__ = ["build_parser", "main"]
