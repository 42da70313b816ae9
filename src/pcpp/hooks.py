"""UNet-level hooks: open each step, split the CFG batch, slice spatial side inputs, gather the output."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .agreement import CHECKED_STEPS, check_ranks_agree
from .audit import check_call
from .comm.base import PatchCommunicator
from .comm.groups import ParallelGroups
from .context import PatchContext
from .errors import PCPPError
from .exchange import Transfer, is_capturing
from .geometry import Geometry
from .stats import LayerKind

__all__ = ["UNetHooks", "gather_rows", "map_tensors"]

# Inputs laid out like the latent (B, C, h, w) at some UNet level: ControlNet and T2I-Adapter residuals. Each
# rank keeps its own rows of them, as of the sample itself (which the entry conv slices). They come full height
# (an unconverted ControlNet, an adapter: cut here) or already as this rank's rows (a converted ControlNet, see
# pcpp.controlnet: kept, and left out of the agreement check, since each rank's rows differ by design).
_SPATIAL_INPUTS = frozenset(
    {"down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals"}
)


def _timestep_value(timestep: Any) -> float | None:
    if isinstance(timestep, Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


class UNetHooks:
    """The forward pre-hook and post-hook that make a converted UNet behave like the original on every rank.

    Args:
        unet: the converted UNet.
        context: its shared step state.
        groups: the patch and CFG communicators.
    """

    def __init__(self, unet: nn.Module, context: PatchContext, groups: ParallelGroups) -> None:
        self.context = context
        self.groups = groups
        self._signature = inspect.signature(unet.forward)
        self._handles = [
            unet.register_forward_pre_hook(self._pre, with_kwargs=True),
            unet.register_forward_hook(self._post, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Detach both hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # Host bookkeeping (step counter, phase, image detection) stays out of compiled graphs: traced, it would make
    # Dynamo guard on the phase and compile the UNet once per phase.
    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model's call arguments by name (``**kwargs`` of its ``forward`` flattened in)."""
        bound = self._signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        return arguments

    @torch.compiler.disable
    def _pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[()], dict[str, Any]]:
        check_call(module)  # FreeU may have been switched on after conversion: its up blocks must be pcpp's
        arguments = self.bind(args, kwargs)
        sample = arguments.get("sample")
        if not isinstance(sample, Tensor) or sample.ndim != 4:
            raise PCPPError(
                f"a converted UNet expects `sample` as a (B, C, H, W) tensor, got {type(sample).__name__}"
                f"{tuple(sample.shape) if isinstance(sample, Tensor) else ''}."
            )
        ctx = self.context
        timestep = (
            _timestep_value(arguments.get("timestep")) if ctx.config.detect_new_image and not is_capturing() else None
        )
        ctx.begin_step(sample.shape[2], sample.shape[3], timestep)
        geo = ctx.geometry
        assert geo is not None
        if ctx.step in CHECKED_STEPS:  # before the CFG split: the ranks of the CFG group hold the same full batch
            rank, split = ctx.patch.rank, ctx.patch.world_size > 1
            # Rows of a converted ControlNet differ between ranks by design; that ControlNet compared its own inputs.
            local = {
                n for n in _SPATIAL_INPUTS & arguments.keys() if split and _holds_own_rows(arguments[n], geo, rank, n)
            }
            compared = {k: v for k, v in arguments.items() if k not in local}
            check_ranks_agree(self.groups, compared, ctx.config, image=ctx.image, step=ctx.step)
        ctx.exchange.order_token(sample.device)  # made here, outside any compiled graph, so compiled code finds it
        if self.groups.cfg_split:
            arguments = self._split_cfg(arguments, sample.shape[0])
        if ctx.patch.world_size > 1:
            for name in _SPATIAL_INPUTS & arguments.keys():
                own = partial(_own_rows, geo=geo, rank=ctx.patch.rank, name=name)
                arguments[name] = map_tensors(arguments[name], own)
        return (), arguments

    def _split_cfg(self, arguments: dict[str, Any], batch: int) -> dict[str, Any]:
        cfg = self.groups.cfg
        assert cfg is not None
        if batch % 2:
            raise PCPPError(
                f"the CFG split needs an even batch ([unconditional, conditional] halves), got batch {batch}; "
                "run with guidance (batch 2k), or convert with a mesh whose 'cfg' dimension has size 1."
            )
        half = batch // 2
        lo = cfg.rank * half

        def take(t: Tensor) -> Tensor:
            return t[lo : lo + half] if t.ndim > 0 and t.shape[0] == batch else t

        return {k: map_tensors(v, take) for k, v in arguments.items()}

    @torch.compiler.disable
    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        ctx = self.context
        try:
            sample = output[0] if isinstance(output, tuple) else output.sample
            full = sample
            if ctx.patch.world_size > 1:
                geo = ctx.geometry
                assert geo is not None
                full = gather_rows(full, ctx.patch, geo.rows, ctx)
            if self.groups.cfg_split:
                cfg = self.groups.cfg
                assert cfg is not None
                full = _gather_batch(full, cfg, ctx)
        finally:
            ctx.end_step()
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.sample = full
        if isinstance(output, dict) and "sample" in output:
            output["sample"] = full
        return output


def map_tensors(value: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside it (nested dicts, lists and tuples kept).

    Tensors are visited in a fixed order (dict insertion order, then sequence order), so mapping two values of
    the same structure visits their tensors in the same order.

    Example:
        >>> import torch
        >>> map_tensors({"a": torch.ones(1), "b": [2, torch.zeros(1)]}, lambda t: t + 1)
        {'a': tensor([2.]), 'b': [2, tensor([1.])]}
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def _own_slice(t: Tensor, geo: Geometry, rank: int, name: str) -> slice | None:
    """This rank's rows of the spatial side input ``t`` (whole height), or ``None`` if ``t`` already is this rank's
    rows (a converted ControlNet's residual).

    The width picks the level (strips span the whole width, and each stride-2 stage halves it, rounding down or
    up), so a strip at one level is never mistaken for the whole map at a deeper one of the same height.

    Raises:
        PCPPError: ``t`` is neither the whole map nor this rank's rows at any level.
    """
    height, width = t.shape[2], t.shape[3]
    seen: list[str] = []
    for level in range(geo.levels + 1):
        if not geo.width >> level <= width <= -(-geo.width >> level):
            continue
        whole, mine = geo.level_height(level), geo.strip_rows(level)[rank]
        if height == whole:
            start = geo.strip_start(rank, level)
            return slice(start, start + mine)
        if height == mine:
            return None
        seen.append(f"level {level}: {whole} rows whole or {mine} rows on rank {rank}")
    where = "; ".join(seen) if seen else "its width matches no level"
    raise PCPPError(
        f"the spatial side input {name} has shape {tuple(t.shape)}, neither the whole map nor rank {rank}'s rows at "
        f"any level of the {geo.height}x{geo.width} latent ({where}); residuals must have the sizes of the UNet's "
        "own activations, whole or this rank's strip."
    )


def _holds_own_rows(value: Any, geo: Geometry, rank: int, name: str) -> bool:
    """Whether any (B, C, h, w) tensor in ``value`` already is this rank's rows."""
    found: list[bool] = []
    map_tensors(value, lambda t: found.append(t.ndim == 4 and _own_slice(t, geo, rank, name) is None))
    return any(found)


def _own_rows(t: Tensor, *, geo: Geometry, rank: int, name: str) -> Tensor:
    if t.ndim != 4:
        return t
    rows = _own_slice(t, geo, rank, name)
    return t if rows is None else t[:, :, rows]


def gather_rows(strip: Tensor, comm: PatchCommunicator, rows: tuple[int, ...], ctx: PatchContext) -> Tensor:
    """Every rank's strip of an output, ``rows[j]`` rows on rank ``j``, joined top to bottom on every rank.

    One all-gather over ``comm`` (strips padded to the tallest), counted as :attr:`LayerKind.OUTPUT`.
    """
    tallest = max(rows)
    padded = F.pad(strip, (0, 0, 0, tallest - strip.shape[2])) if strip.shape[2] < tallest else strip
    out = torch.empty((comm.world_size * padded.shape[0], *padded.shape[1:]), dtype=strip.dtype, device=strip.device)
    transfer = Transfer("output gather over the patch group", gather=(out, padded.contiguous()))
    ctx.exchange.post(LayerKind.OUTPUT, transfer, _what(transfer, ctx), comm=comm).wait()
    batch = strip.shape[0]
    return torch.cat([out[j * batch : (j + 1) * batch, :, : rows[j]] for j in range(comm.world_size)], dim=2)


def _gather_batch(half: Tensor, comm: PatchCommunicator, ctx: PatchContext) -> Tensor:
    out = torch.empty((comm.world_size * half.shape[0], *half.shape[1:]), dtype=half.dtype, device=half.device)
    transfer = Transfer("output gather over the CFG group", gather=(out, half.contiguous()))
    ctx.exchange.post(LayerKind.OUTPUT, transfer, _what(transfer, ctx), comm=comm).wait()
    return out


def _what(transfer: Transfer, ctx: PatchContext) -> str:
    return f"{transfer.purpose} (step {ctx.step})"
