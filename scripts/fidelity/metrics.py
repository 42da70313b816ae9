"""Image and noise-prediction metrics: PSNR, SSIM, LPIPS, the eps of any prediction type, summaries."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def image_metrics(images: Tensor, reference: Tensor) -> dict[str, list[float]]:
    """Per-image PSNR (dB) and SSIM of ``images`` against ``reference``, both float ``(N, 3, H, W)`` in [0, 1].

    PSNR is infinite for bit-identical images.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    images = images.detach().double().clamp(0, 1)
    reference = reference.detach().double().clamp(0, 1)
    psnr = peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(images, reference, data_range=1.0, reduction="none")
    assert isinstance(ssim, Tensor)  # a tuple only with return_full_image / return_contrast_sensitivity
    return {"psnr": [float(v) for v in psnr.reshape(-1)], "ssim": [float(v) for v in ssim.reshape(-1)]}


def relative_l2(prediction: Tensor, reference: Tensor) -> Tensor:
    """``||prediction - reference|| / ||reference||`` per leading index, in float64."""
    diff = (prediction.double() - reference.double()).flatten(1).norm(dim=1)
    return diff / reference.double().flatten(1).norm(dim=1).clamp_min(1e-30)


def to_eps(output: Tensor, sample: Tensor, alpha_bar: float, prediction_type: str) -> Tensor:
    """The noise prediction ``eps`` from a model output of the given prediction type.

    Args:
        output: the (guided) model output.
        sample: the noisy input ``x_t`` it was computed from.
        alpha_bar: the scheduler's cumulative alpha at this timestep.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Raises:
        ValueError: unknown prediction type.
    """
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a * output + s * sample
    if prediction_type == "sample":
        return (sample - a * output) / max(s, 1e-12)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, std, min, 5/50/95 percentiles and max of the finite values; ``n_inf`` counts infinite ones.

    Returns:
        The summary (statistics are None when no value is finite).
    """
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    finite = t[torch.isfinite(t)]
    out: dict[str, Any] = {"n": int(t.numel()), "n_inf": int(torch.isinf(t).sum())}
    if finite.numel() == 0:
        return out | dict.fromkeys(("mean", "std", "min", "p5", "p50", "p95", "max"))
    q = torch.quantile(finite, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return out | {
        "mean": float(finite.mean()),
        "std": float(finite.std()) if finite.numel() > 1 else 0.0,
        "min": float(finite.min()),
        "p5": float(q[0]),
        "p50": float(q[1]),
        "p95": float(q[2]),
        "max": float(finite.max()),
    }


def lpips_metric(device: torch.device) -> Callable[[Tensor, Tensor], list[float]]:
    """A function ``(images, reference) -> per-image LPIPS`` (torchmetrics, AlexNet, images in [0, 1]) on ``device``.

    See :func:`lpips_available` for whether it can run without downloading AlexNet's weights.
    """
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="none").to(device)

    def compute(images: Tensor, reference: Tensor) -> list[float]:
        with torch.no_grad():
            values = metric(images.to(device).clamp(0, 1), reference.to(device).clamp(0, 1))
        return [float(v) for v in values.reshape(-1)]

    return compute


def lpips_available() -> tuple[bool, str]:
    """Whether torchmetrics' LPIPS can run without a download: torchvision installed, AlexNet weights cached.

    Returns:
        ``(available, reason)``.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False, "torchvision is not installed"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return False, f"AlexNet weights are not in {hub} (torchmetrics would download them)"
    return True, "AlexNet weights found"


def finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values, infinite when there are none (all images identical to the reference)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf
