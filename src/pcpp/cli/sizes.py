"""Which image sizes a model can be split into strips at, read from its config files alone (no weights loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SizeRule", "size_rule"]


@dataclass(frozen=True)
class SizeRule:
    """The pixel sizes a model accepts when its UNet is split into horizontal strips.

    Every strip must hold a whole number of the UNet's smallest feature rows, so the height is cut in multiples of
    ``height_unit`` pixels, at least one per strip.

    Attributes:
        height_unit: Pixels per row of the UNet's coarsest level (VAE factor times the UNet's downsampling).
        width_unit: The width must be a multiple of this (what the model itself needs; the width is not split).
        why: Where the units come from, for the error message.
    """

    height_unit: int
    width_unit: int
    why: str

    def problem(self, height: int, width: int, strips: int) -> str | None:
        """Why ``height x width`` cannot be split into ``strips`` strips, or None if it can.

        Args:
            height: Image height in pixels.
            width: Image width in pixels.
            strips: Number of strips (processes of one patch group).

        Returns:
            One sentence naming the size that works, or None.
        """
        smallest = strips * self.height_unit
        if height % self.height_unit or height < smallest:
            fit = max(smallest, -(-height // self.height_unit) * self.height_unit)
            per = "" if strips == 1 else f" and at least {smallest} for {strips} strips"
            return (
                f"--height {height} cannot be split: {self.why}, so the height must be a multiple of "
                f"{self.height_unit} pixels{per}; the nearest height that works is {fit}"
            )
        if width % self.width_unit:
            fit = -(-width // self.width_unit) * self.width_unit
            return f"--width {width} is not a multiple of {self.width_unit} pixels ({self.why}); try --width {fit}"
        return None


def _levels(unet_config: dict[str, Any]) -> int:
    # diffusers' UNet2D(Condition)Model puts a stride-2 downsampler on every down block but the last.
    return max(0, len(unet_config.get("down_block_types", ())) - 1)


def _read_json(model: str, name: str) -> dict[str, Any] | None:
    folder = Path(model)
    if folder.is_dir():
        path: Path | None = folder / name
    else:  # a hub id: only what is already in the local cache (no download before validation)
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, name)
        except Exception:  # an id the hub library refuses: the pipeline load will name the problem
            return None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def size_rule(model: str) -> SizeRule | None:
    """The size rule of ``--model``, from its UNet's (and VAE's) ``config.json``.

    Args:
        model: ``"tiny"`` or a diffusers pipeline folder or hub id.

    Returns:
        The rule, or None if the configs cannot be read without loading the model (then the model is checked when
        it runs).
    """
    if model == "tiny":
        from pcpp.models import weights_dir

        unet = _read_json(str(weights_dir()), "unet/config.json")
        levels = _levels(unet or {"down_block_types": [0, 0, 0]})
        unit = 2**levels
        return SizeRule(unit, unit, f"the tiny model works on pixels and its UNet downsamples {unit}x")
    unet = _read_json(model, "unet/config.json")
    if unet is None:
        return None
    vae = _read_json(model, "vae/config.json")
    vae_factor = 2 ** max(0, len(vae.get("block_out_channels", ())) - 1) if vae else 1
    unet_factor = 2 ** _levels(unet)
    latent = f"its VAE downsamples {vae_factor}x and " if vae else "it has no VAE and "
    return SizeRule(vae_factor * unet_factor, vae_factor, f"{latent}its UNet downsamples {unet_factor}x more")
