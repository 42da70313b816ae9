"""Fidelity study of PCPP: how close patch-parallel images are to the single-device images, per setting.

For every number of ranks, image size and mode (exact; full conditioning; partial ratios; warmup lengths) the
study generates the same prompt/seed pairs on ``ranks`` processes (gloo on the CPU, or NCCL) and compares them
with the single-device images of the unconverted UNet:

* **PSNR and SSIM** of the final images, per image, on float images in ``[0, 1]`` (``data_range=1.0``;
  torchmetrics), summarised by mean, std, min, 5/50/95 percentiles and max;
* **noise-prediction error** at each step after warmup: a forward hook on the converted UNet records the input
  ``x_t`` and the output of every call for a subset of prompts; afterwards the unconverted UNet is run on the same
  inputs and the relative L2 error of the guided noise prediction (``eps``; v-predictions are converted with the
  scheduler's ``alpha_bar``) is computed per image and step;
* LPIPS (torchmetrics, AlexNet) for real pipelines when its weights are on disk; skipped otherwise.

One process group is spawned per rank count, and inside it the UNet is converted and reverted once per
(resolution, mode); all prompts of one configuration run as one batch (``2 * prompts`` images with CFG). The
single-device reference images are computed once per resolution in a separate spawn (prompts split over the
processes) and cached on disk.

Outputs: a JSON file with every number (per-image values included), a markdown table (written into the block
between ``<!-- fidelity-table:begin -->`` and ``<!-- fidelity-table:end -->`` of the ``--table`` file if it has
one, else as the whole file), and PNG figures: a latency/fidelity plot, PSNR against the partial ratio, the
per-step noise error, and image grids with amplified difference maps.

The command is ``python scripts/fidelity_study.py`` (see its docstring and ``docs/fidelity.md``). Modules, in the
order a run uses them:

* :mod:`fidelity.arguments`: the command line and the study it describes;
* :mod:`fidelity.plan`: the preset plans, the modes and the configurations (``RANKSxSIZES:MODES``), the captions;
* :mod:`fidelity.job`: what every rank is given (:class:`~fidelity.job.Job`), the work folder's cache names;
* :mod:`fidelity.study`: the orchestration: references, one spawn per rank count, merging the ranks' shares;
* :mod:`fidelity.ranks`: the per-rank work in the spawned processes;
* :mod:`fidelity.samplers`: the tiny model's and a diffusers pipeline's denoising loop;
* :mod:`fidelity.recorder`: the forward hook that records the converted UNet's calls for the eps error;
* :mod:`fidelity.metrics`: PSNR, SSIM, LPIPS, eps conversion and error, summaries;
* :mod:`fidelity.report`: the JSON document, the environment, the figures;
* :mod:`fidelity.markdown`, :mod:`fidelity.plots`, :mod:`fidelity.grids`: tables, plots, image grids;
* :mod:`fidelity.main`: :func:`~fidelity.main.run` and :func:`~fidelity.main.main`.
"""
