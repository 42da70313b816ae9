"""Whole diffusers pipelines: ``pcpp.parallelize(pipe)`` converts what runs per step and keeps ``pipe(...)`` as is.

Every rank builds the same pipeline, calls :func:`parallelize` on it and then calls ``pipe(...)`` with the same
inputs (prompt, seed, sizes, images). The UNet is converted with :func:`pcpp.convert`; so is each ControlNet, with
the UNet's options (it runs on this rank's strip of the latent and of the control image and hands the UNet this
rank's rows of its residuals; see :mod:`pcpp.controlnet`), and the VAE with ``vae=VAEPlacement.PARALLEL`` (its
encoder and decoder then run on strips, exact). The text encoders, the scheduler (and the VAE with
``VAEPlacement.WHOLE``) run whole on every rank, on identical inputs, so they agree without communication.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from .api import convert, is_converted, reset, revert
from .comm.groups import CommLike, resolve_groups
from .controlnet import controlnet_nets
from .errors import ConversionError
from .plan import unet_levels

__all__ = ["OutputPlacement", "VAEPlacement", "is_parallelized", "parallelize", "revert_pipeline"]

logger = logging.getLogger(__name__)

P = TypeVar("P")

_ATTR = "_pcpp_pipeline"

# The pipelines whose every per-step model input pcpp knows: the UNet's sample, its conditioning, and spatial side
# inputs (the converted ControlNets' residuals, already each rank's rows). Checked by exact type: a subclass may
# call its UNet differently.
_SUPPORTED = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
)


class VAEPlacement(enum.Enum):
    """Where the VAE runs.

    Attributes:
        WHOLE: every rank encodes (img2img, inpainting) and decodes the whole image itself, as on one device. VAE
            tiling (``pipe.vae.enable_tiling()``) is kept if the user enabled it.
        PARALLEL: the default. The VAE is converted with :func:`pcpp.convert` on the patch group: every rank
            encodes and decodes its strip (exact; each rank holds about 1/N of the activations) and gets the whole
            image. Tiling is refused. With ``OutputPlacement.FIRST_RANK`` every rank still takes part in the
            decode.
    """

    WHOLE = "whole"
    PARALLEL = "parallel"


class OutputPlacement(enum.Enum):
    """Which ranks get the images.

    Attributes:
        ALL_RANKS: every rank decodes and returns the images, as on one device.
        FIRST_RANK: only the first rank (patch rank 0 of CFG rank 0; rank 0 for the default process group)
            decodes and returns them. The other ranks run the denoising loop with it but skip the VAE decode and
            the safety checker, and get an output whose ``images`` is an empty list (``[]``: the output types of
            diffusers allow a list of images, not ``None``) and whose other fields are ``None``; with
            ``return_dict=False`` the tuple ``([], None, ...)``.
    """

    ALL_RANKS = "all_ranks"
    FIRST_RANK = "first_rank"


@dataclass(frozen=True)
class _Parallelized:
    """What :func:`parallelize` changed on a pipeline, for :func:`revert_pipeline`."""

    original_class: type
    progress_bar: dict[str, Any]
    vae: VAEPlacement
    output: OutputPlacement
    first: bool  # whether this rank is the first rank (shows the progress bar, gets the images)


def _convert_option_names() -> set[str]:
    return set(inspect.signature(convert).parameters) - {"unet", "comm"}


def _check(pipe: Any, vae: VAEPlacement, output: OutputPlacement, convert_options: dict[str, Any]) -> None:
    """Raise :class:`ConversionError` if ``pipe`` cannot be parallelised as asked; changes nothing."""
    name = type(pipe).__name__
    if is_parallelized(pipe):
        raise ConversionError(
            f"this {name} is already parallelised by pcpp.parallelize; call pcpp.revert(pipe) first to parallelise "
            "it again with other settings."
        )
    if name not in _SUPPORTED or type(pipe).__module__.split(".")[0] != "diffusers":
        raise ConversionError(
            f"pcpp.parallelize does not support {name}; supported pipelines: {', '.join(_SUPPORTED)}. For another "
            "pipeline, convert its UNet alone with pcpp.convert(pipe.unet) and check the images against one device."
        )
    if not isinstance(vae, VAEPlacement):
        raise ConversionError(
            f"vae={vae!r} must be a pcpp.VAEPlacement member ({', '.join(VAEPlacement.__members__)})."
        )
    if not isinstance(output, OutputPlacement):
        raise ConversionError(
            f"output={output!r} must be a pcpp.OutputPlacement member ({', '.join(OutputPlacement.__members__)})."
        )
    unknown = sorted(set(convert_options) - _convert_option_names())
    if unknown:
        raise ConversionError(
            f"pcpp.parallelize: unknown option(s) {unknown}; it passes pcpp.convert's options "
            f"{sorted(_convert_option_names())}."
        )
    if vae is VAEPlacement.PARALLEL:
        from .vae import is_vae

        if not is_vae(getattr(pipe, "vae", None)):
            raise ConversionError(
                f"vae=VAEPlacement.PARALLEL splits a diffusers AutoencoderKL; this {name}'s VAE is "
                f"{type(getattr(pipe, 'vae', None)).__name__}: use VAEPlacement.WHOLE."
            )
        if is_converted(pipe.vae):
            raise ConversionError(
                f"the VAE of this {name} was already converted with pcpp.convert; call pcpp.revert(pipe.vae) first."
            )
        if getattr(pipe.vae, "use_tiling", False):
            raise ConversionError(
                "vae=VAEPlacement.PARALLEL does not tile (the strips replace the tiles): call "
                "pipe.vae.disable_tiling(), or use VAEPlacement.WHOLE to keep tiling."
            )
    if is_converted(pipe.unet):
        raise ConversionError(
            f"the UNet of this {name} was already converted with pcpp.convert; call pcpp.revert(pipe.unet) first, "
            "then pcpp.parallelize(pipe, ...) alone converts it."
        )
    for i, net in enumerate(controlnet_nets(getattr(pipe, "controlnet", None))):
        if is_converted(net):
            raise ConversionError(
                f"ControlNet {i} of this {name} was already converted with pcpp.convert; call pcpp.revert on it "
                "first, then pcpp.parallelize(pipe, ...) alone converts it."
            )
        # Its residuals must be cut into the UNet's strips: the same stride-2 stages give the same row unit.
        if unet_levels(net) != unet_levels(pipe.unet):
            raise ConversionError(
                f"ControlNet {i} of this {name} has {unet_levels(net)} stride-2 stages and the UNet "
                f"{unet_levels(pipe.unet)}; pcpp splits a ControlNet built like its UNet (ControlNetModel.from_unet)."
            )


def parallelize(
    pipe: P,
    *,
    comm: CommLike = None,
    vae: VAEPlacement = VAEPlacement.PARALLEL,
    output: OutputPlacement = OutputPlacement.ALL_RANKS,
    **convert_options: Any,
) -> P:
    """Make a diffusers pipeline patch-parallel in place, and return it; ``pcpp.revert(pipe)`` undoes it.

    Every rank must call this on an identical pipeline, then call ``pipe(...)`` with identical arguments (prompt,
    generator seed, sizes, images): each rank denoises one horizontal strip of the latent, and every rank (or the
    first, see ``output``) gets the image of one device. Each call of ``pipe`` starts a new image (synchronous
    warmup again). The UNet, the ControlNet(s) (and, by default, the VAE) are converted by :func:`pcpp.convert`;
    a 2-D ``("cfg", "patch")`` mesh also splits the classifier-free-guidance batch (the UNet's; a ControlNet
    runs its strip for the whole batch it is given). The progress bar shows on the first
    rank only. LoRA weights may be loaded (``load_lora_weights``, ``set_adapters``, ``fuse_lora``) before or after;
    the scheduler may be any diffusers scheduler and may be swapped afterwards.

    Args:
        pipe: one of StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
            StableDiffusionControlNetPipeline (one ControlNet or several) and their StableDiffusionXL versions.
        comm: who splits the image, as for :func:`pcpp.convert` (``None``: the default process group).
        vae: where the VAE runs; see :class:`VAEPlacement`.
        output: which ranks get the images; see :class:`OutputPlacement`.
        **convert_options: passed to :func:`pcpp.convert` (``partial``, ``warmup_steps``, ``exact``, ...).

    Returns:
        ``pipe`` itself.

    Raises:
        ConversionError: ``pipe`` is not a supported pipeline or is already parallelised, an option is unknown or
            invalid, ``comm`` is unusable, a ControlNet cannot be split (``global_pool_conditions``, stages unlike
            the UNet's), or the VAE is tiled with ``VAEPlacement.PARALLEL``. Nothing is changed.
        UnsupportedModuleError: the UNet or a ControlNet has modules pcpp cannot split. Nothing is changed.

    Example:
        >>> import torch, torch.distributed as dist, pcpp  # doctest: +SKIP
        >>> from diffusers import StableDiffusionXLPipeline  # doctest: +SKIP
        >>> dist.init_process_group("nccl")  # doctest: +SKIP
        >>> pipe = StableDiffusionXLPipeline.from_pretrained(  # doctest: +SKIP
        ...     "stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16
        ... ).to(f"cuda:{dist.get_rank()}")
        >>> pcpp.parallelize(pipe)  # doctest: +SKIP
        >>> image = pipe("a fox", generator=torch.Generator().manual_seed(0)).images[0]  # doctest: +SKIP
    """
    _check(pipe, vae, output, convert_options)
    groups = resolve_groups(comm)
    first = groups.patch.rank == 0 and (groups.cfg is None or groups.cfg.rank == 0)
    converted: list[Any] = []
    try:
        converted.append(convert(pipe.unet, comm=groups, **convert_options))  # type: ignore[attr-defined]
        # The ControlNets and the VAE share the UNet's communicator and message tags (each model numbers its
        # layers from 1). Every rank runs the models in the same order, and messages between two ranks with one
        # tag are matched in posting order, so they meet their own kind; after asynchronous steps a model's layers
        # have messages in flight for a step that never comes, but every pair of ranks posted them both ways, so
        # they meet each other, not the next model's (tests/test_vae.py and tests/test_controlnet.py check it).
        for net in controlnet_nets(getattr(pipe, "controlnet", None)):
            converted.append(convert(net, comm=groups, **convert_options))
        if vae is VAEPlacement.PARALLEL:
            vae_options = {k: v for k, v in convert_options.items() if k in ("timeout", "fused_norm")}
            converted.append(convert(pipe.vae, comm=groups.patch, **vae_options))  # type: ignore[attr-defined]
    except BaseException:
        for model in reversed(converted):
            revert(model)
        raise
    # Nothing below can fail: the checks and the conversion are done.
    progress_bar = dict(getattr(pipe, "_progress_bar_config", None) or {})
    # A bar the user turned off stays off; otherwise it shows on the first rank only.
    disable = bool(progress_bar.get("disable", False)) or not first
    pipe.set_progress_bar_config(**{**progress_bar, "disable": disable})  # type: ignore[attr-defined]
    state = _Parallelized(type(pipe), progress_bar, vae, output, first)
    pipe.__class__ = _parallel_class(type(pipe))
    setattr(pipe, _ATTR, state)
    if vae is VAEPlacement.WHOLE and getattr(pipe.vae, "use_tiling", False):  # type: ignore[attr-defined]
        logger.info("pcpp: the VAE of this pipeline is tiled (the user's choice); every rank decodes all tiles")
    logger.info(
        "pcpp: parallelised %s (vae %s, output %s); this rank is %sthe first",
        state.original_class.__name__,
        vae.name,
        output.name,
        "" if first else "not ",
    )
    return pipe


def is_parallelized(pipe: Any) -> bool:
    """Whether ``pipe`` was parallelised by :func:`parallelize` and not reverted.

    Example:
        >>> import pcpp.pipeline
        >>> pcpp.pipeline.is_parallelized(object())
        False
    """
    return isinstance(getattr(pipe, _ATTR, None), _Parallelized)


def revert_pipeline(pipe: P) -> P:
    """Undo :func:`parallelize`: revert the UNet, the ControlNets (and the VAE if it was converted), restore the
    progress bar settings and the pipeline's class.

    A LoRA loaded after :func:`parallelize` stays loaded on the modules it was loaded into; unload it
    (``pipe.unload_lora_weights()``) before reverting, as converted self-attention modules are replaced by the
    originals.

    Args:
        pipe: a pipeline returned by :func:`parallelize`.

    Returns:
        ``pipe`` itself, as before :func:`parallelize`.

    Raises:
        ConversionError: ``pipe`` is not parallelised.
    """
    state = getattr(pipe, _ATTR, None)
    if not isinstance(state, _Parallelized):
        raise ConversionError(
            f"pcpp.revert: this {type(pipe).__name__} is not parallelised; call pcpp.parallelize(pipe) first."
        )
    unet = pipe.unet  # type: ignore[attr-defined]
    if is_converted(unet):
        revert(unet)
    for net in controlnet_nets(getattr(pipe, "controlnet", None)):
        if is_converted(net):
            revert(net)
    if state.vae is VAEPlacement.PARALLEL and is_converted(pipe.vae):  # type: ignore[attr-defined]
        revert(pipe.vae)  # type: ignore[attr-defined]
    pipe.set_progress_bar_config(**state.progress_bar)  # type: ignore[attr-defined]
    pipe.__class__ = state.original_class
    delattr(pipe, _ATTR)
    return pipe


def _parallel_class(cls: type) -> type:
    """A subclass of ``cls`` with the same names whose ``__call__`` starts a new image and places the output.

    ``__call__`` is looked up on the type, so the instance's class is swapped (and swapped back by revert). The
    names stay ``cls``'s so that ``save_pretrained`` writes the original ``_class_name``.
    """
    original = cls.__call__
    signature = inspect.signature(original)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        state: _Parallelized = getattr(self, _ATTR)
        for model in [self.unet, *controlnet_nets(getattr(self, "controlnet", None))]:
            reset(model)
        if state.first or state.output is OutputPlacement.ALL_RANKS:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        if state.vae is VAEPlacement.WHOLE:
            bound.arguments["output_type"] = "latent"  # the loop runs on every rank; the decode only on the first
        result = original(*bound.args, **bound.kwargs)  # a parallel decode needs every rank, so it runs here too
        if isinstance(result, tuple):
            return ([], *(None for _ in result[1:]))
        return dataclasses.replace(
            result, **{f.name: [] if f.name == "images" else None for f in dataclasses.fields(result)}
        )

    __call__.__doc__ = original.__doc__
    names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), {"__call__": __call__, **names})
