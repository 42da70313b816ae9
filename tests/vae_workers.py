"""Per-rank functions for the parallel-VAE tests (tests/test_vae.py). They run in spawned processes."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

import pcpp


def build_vae(seed: int = 0) -> AutoencoderKL:
    """A small random AutoencoderKL with SD's block structure: four levels (three upsamplers, three
    downsamplers), mid-block attention with a GroupNorm inside, small channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def latent(height: int, width: int, batch: int = 1, seed: int = 1) -> Tensor:
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


def image(height: int, width: int, batch: int = 1, seed: int = 2) -> Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _largest_outputs(module: nn.Module) -> tuple[list[int], list[Any]]:
    """Record the largest output (elements) of any submodule of ``module`` while it runs."""
    largest = [0]

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            largest[0] = max(largest[0], out.numel())

    handles = [m.register_forward_hook(hook) for name, m in module.named_modules() if name]
    return largest, handles


def _decodes(vae: AutoencoderKL, heights: list[int], width: int, slicing: bool) -> dict[str, Any]:
    """``vae`` decodes latents of each height; the images and the decoder's largest activation of each."""
    if slicing:
        vae.enable_slicing()
    out: dict[str, Any] = {"images": [], "largest": []}
    with torch.no_grad():
        for height in heights:
            largest, handles = _largest_outputs(vae.decoder)
            out["images"].append(vae.decode(latent(height, width, batch=2 if slicing else 1)).sample)
            for handle in handles:
                handle.remove()
            out["largest"].append(largest[0])
    return out


def decode(rank: int, world: int, heights: list[int], width: int, slicing: bool = False) -> dict[str, Any]:
    """Every rank decodes latents of each height with the converted VAE; also the largest activation."""
    return _decodes(pcpp.convert(build_vae()), heights, width, slicing)


def decode_reference(heights: list[int], width: int, slicing: bool = False) -> dict[str, Any]:
    """The same decodes on one device, unconverted."""
    return _decodes(build_vae(), heights, width, slicing)


def encode(rank: int, world: int, height: int, width: int) -> Tensor:
    """Every rank encodes the same image with the converted VAE: the posterior's moments."""
    vae = pcpp.convert(build_vae())
    with torch.no_grad():
        return vae.encode(image(height, width)).latent_dist.parameters


def encode_reference(height: int, width: int) -> Tensor:
    with torch.no_grad():
        return build_vae().encode(image(height, width)).latent_dist.parameters


def bad_input(rank: int, world: int) -> dict[str, Any]:
    """A latent too short for every rank to get a strip, and tiling switched on: clear errors; then the VAE still
    decodes correctly, and tiling is refused at conversion."""
    errors: dict[str, Any] = {}
    vae = pcpp.convert(build_vae())
    with torch.no_grad():
        try:
            vae.decode(latent(world - 1, 4))
        except pcpp.SplitError as err:
            errors["short"] = str(err)
        vae.enable_tiling()
        try:
            vae.decode(latent(world, 4))
        except pcpp.PCPPError as err:
            errors["tiling_after"] = str(err)
        vae.disable_tiling()
        errors["after"] = vae.decode(latent(world, 4)).sample
        pcpp.revert(vae)
        tiled = build_vae()
        tiled.enable_tiling()
        try:
            pcpp.convert(tiled)
        except pcpp.ConversionError as err:
            errors["tiling_convert"] = str(err)
        errors["tiled_converted"] = pcpp.is_converted(tiled)
    return errors


def build_small_vae(seed: int = 0) -> AutoencoderKL:
    """:func:`build_vae` with two levels (one upsampler, one downsampler): every kind of layer the parallel VAE
    converts (convolutions with halos, GroupNorms, the mid-block attention, an upsampler), half the code to
    compile."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()


def compiled_decode(rank: int, world: int, height: int, width: int, target: str) -> dict[str, Any]:
    """The converted (small) VAE's decode under ``torch.compile`` (Inductor, static shapes) twice, the second call
    reusing the compiled code, then eagerly; with Dynamo's counts of graphs compiled and of graph breaks.

    ``target`` is what is compiled: ``"decoder"`` (``vae.decoder = torch.compile(vae.decoder)``, called through
    ``vae.decode``) or ``"decode"`` (``torch.compile(vae.decode)``).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    vae = pcpp.convert(build_small_vae())
    z = latent(height, width)
    with torch.no_grad():
        if target == "decoder":
            plain = vae.decoder
            vae.decoder = torch.compile(plain, backend="inductor", dynamic=False)
            compiled = [vae.decode(z).sample for _ in range(2)]
            vae.decoder = plain
        else:
            decode = torch.compile(vae.decode, backend="inductor", dynamic=False)
            compiled = [decode(z).sample for _ in range(2)]
        eager = vae.decode(z).sample
    return {
        "compiled": compiled,
        "eager": eager,
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
        "break_reasons": sorted(counters["graph_break"]),
    }


def sdxl_fp16_image(rank: int | None = None, world: int | None = None) -> Tensor:
    """One image of the tiny SDXL-style pipeline in float16, whose VAE has ``force_upcast`` (diffusers' SDXL default):
    the pipeline casts the VAE to float32 for the decode and back. Parallelised (exact) when called with a rank."""
    import tempfile
    from pathlib import Path

    import pcpp
    from pipeline_parts import Family, Spec, build_pipeline, call_kwargs

    spec = Spec(Family.SDXL)
    pipe = build_pipeline(spec, Path(tempfile.mkdtemp())).to(torch.float16)
    assert pipe.vae.config.force_upcast
    if rank is not None:
        pcpp.parallelize(pipe, exact=True)
    images: Tensor = pipe(**{**call_kwargs(spec), "output_type": "pt"}).images
    assert pipe.vae.dtype == torch.float16  # cast back after the decode, converted or not
    return images.float()
