"""Ranks agree, or the image stops: compare every rank's inputs at the start of an image.

Every rank of a converted UNet computes one strip of the same image, so every rank must call the UNet with the same
latent, timestep, conditioning and pcpp settings. Nothing in the parallel layers can notice when they do not (a
different seed per rank gives each rank a clean strip of its own image and noise elsewhere; a different prompt
gives a chimera). :func:`check_ranks_agree` makes each rank summarise its inputs as a fixed-length int64 vector,
gathers the vectors of all ranks, and raises :class:`pcpp.RanksDisagreeError` on every rank if any two differ.

The vector's length does not depend on the inputs, so ranks with different latent sizes meet in the same
collective and get the error rather than a transport abort. Tensor values enter through :func:`tensor_checksum`,
an integer weighted sum of their bits computed on their device: exact and independent of reduction order and
memory layout. What it costs and what it misses: docs/reliability.md, "Ranks that disagree".
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._version import __version__
from .comm.base import PatchCommunicator
from .comm.groups import ParallelGroups
from .config import PCPPConfig
from .errors import RanksDisagreeError

__all__ = ["CHECKED_STEPS", "check_ranks_agree", "tensor_checksum"]

CHECKED_STEPS = (0, 1)
"""The steps of an image at which the ranks compare their inputs. Step 0 catches different seeds, prompts, sizes,
settings and (with "leading" timestep spacing) step counts; step 1 catches different step counts where every count
starts at the same timestep ("linspace" and "trailing" spacing, Karras sigmas: 999 first) and latents that drifted
apart in the scheduler's first update (an ancestral sampler drawing its noise from a different generator per rank)."""

# Each chunk of a checksum converts at most this many 16-bit words to int64 at once (8 MiB of temporaries).
_CHUNK = 1 << 20
# Knuth's multiplicative constant: bits 16-31 of index * _MULT are the weight of the word at that index.
_MULT = 2654435761
_LENGTH = 64  # slots of the vector; fixed so that every pcpp version's vectors meet in the same collective
_ARGUMENTS = frozenset({"sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "return_dict"})
_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool,
)  # fmt: skip


def tensor_checksum(tensor: Tensor, start: int = 0) -> Tensor:
    """An exact checksum of ``tensor``'s values, as an int64 scalar on its device.

    The tensor's bits, read as 16-bit words (bytes for 1-byte dtypes) in logical (row-major) order, are summed in
    int64 with odd pseudo-random weights drawn from each word's index. Integer sums are exact, so the result does
    not depend on reduction order, thread count or device, and equals for tensors with equal values whatever
    their strides. Changing any one word always changes it (its weight is odd and no sum overflows for tensors
    below 2**31 words); two unrelated inputs share it with a chance below 2**-31 (about 2**-40 for a latent).

    Args:
        tensor: any tensor; only read.
        start: the index of the first word, to chain several tensors into one checksum (see the example).

    Returns:
        The checksum, a 0-dim int64 tensor on ``tensor``'s device (reading it on the host synchronises).

    Example:
        >>> import torch
        >>> x = torch.arange(6.0).reshape(2, 3)
        >>> bool(tensor_checksum(x) == tensor_checksum(x.t().contiguous().t()))
        True
        >>> bool(tensor_checksum(x) == tensor_checksum(x.flip(0)))
        False
    """
    with torch.no_grad():
        flat = tensor.detach().contiguous().view(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        elif flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        words = flat.view(torch.int16) if flat.element_size() % 2 == 0 else flat.view(torch.uint8)
        total = torch.zeros((), dtype=torch.int64, device=flat.device)
        for lo in range(0, words.numel(), _CHUNK):
            part = words[lo : lo + _CHUNK]
            index = torch.arange(start + lo, start + lo + part.numel(), dtype=torch.int64, device=part.device)
            weight = ((index * _MULT) >> 16 & 0xFFFF) | 1
            total += (part.to(torch.int64) * weight).sum()
        return total


def _words(tensor: Tensor) -> int:
    """How many words :func:`tensor_checksum` reads from ``tensor``."""
    size = tensor.element_size()
    return tensor.numel() * (size // 2 if size % 2 == 0 else size)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _float_bits(value: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES) + _crc(str(dtype))


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).removeprefix("torch.") if 0 <= code < len(_DTYPES) else f"dtype #{code}"


def _scalar(value: Any) -> int:
    """A config field as one slot: exact for the types PCPPConfig uses, a crc of its repr otherwise."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return _float_bits(value)
    if isinstance(value, enum.Enum):
        return list(type(value)).index(value)
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    return _crc(repr(value))


def _show_scalar(value: Any) -> Callable[[Sequence[int]], str] | None:
    if isinstance(value, bool):
        return lambda s: str(bool(s[0]))
    if isinstance(value, int):
        return lambda s: str(s[0])
    if isinstance(value, float):
        return lambda s: f"{_bits_float(s[0]):g}"
    if isinstance(value, enum.Enum):
        members = list(type(value))
        return lambda s: members[s[0]].name if 0 <= s[0] < len(members) else "?"
    if isinstance(value, timedelta):
        return lambda s: f"{s[0] / 1e6:g} s"
    return None


@dataclasses.dataclass(frozen=True)
class _Field:
    """A run of slots of the vector: what the message calls it, and how to show one rank's value (None: a
    checksum, which the message names by the groups of ranks that share it)."""

    label: str
    width: int
    show: Callable[[Sequence[int]], str] | None = None


def _walk(value: Any, path: str, out: list[tuple[str, Tensor]], meta: list[str]) -> None:
    """Tensors inside ``value`` with their paths into ``out``; the rest of its structure and scalars into ``meta``."""
    if isinstance(value, Tensor):
        out.append((path, value))
        meta.append(f"{path}:{tuple(value.shape)}:{value.dtype}")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _walk(value[key], f"{path}.{key}", out, meta)
    elif isinstance(value, list | tuple):
        meta.append(f"{path}:{type(value).__name__}[{len(value)}]")
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", out, meta)
    elif value is None or isinstance(value, bool | int | float | str | enum.Enum):
        meta.append(f"{path}={value!r}")
    else:
        meta.append(f"{path}:{type(value).__qualname__}")  # an object: its repr may hold an address


def _group_checksum(value: Any, name: str, device: torch.device) -> tuple[int, Tensor]:
    """(crc of the structure, shapes, dtypes and scalars; checksum of every tensor chained) of one argument."""
    tensors: list[tuple[str, Tensor]] = []
    meta: list[str] = []
    _walk(value, name, tensors, meta)
    total = torch.zeros((), dtype=torch.int64, device=device)
    start = 0
    for _, tensor in tensors:
        total = total + tensor_checksum(tensor, start).to(device)
        start += _words(tensor)
    return _crc("|".join(meta)), total


def _fingerprint(arguments: dict[str, Any], config: PCPPConfig, step: int, rank: int) -> tuple[list[_Field], Tensor]:
    """The fields of the vector and this rank's vector (int64, ``_LENGTH`` slots, on the latent's device)."""
    sample: Tensor = arguments["sample"]
    device = sample.device
    fields: list[_Field] = []
    host: list[int] = []
    on_device: list[tuple[int, Tensor]] = []  # (slot, int64 scalar) filled in on the device

    def add(field: _Field, values: Sequence[int | Tensor]) -> None:
        assert len(values) == field.width
        fields.append(field)
        for value in values:
            if isinstance(value, Tensor):
                on_device.append((len(host), value))
                host.append(0)
            else:
                host.append(value)

    add(_Field("rank", 1), [rank])  # slot 0: the rank's name in messages, never compared
    add(_Field("pcpp version", 1), [_crc(__version__)])
    add(_Field("step of the image", 1, lambda s: str(s[0])), [step])
    shape = list(sample.shape) + [-1] * (4 - sample.ndim)
    add(_Field("latent shape", 4, lambda s: "x".join(str(d) for d in s if d >= 0)), shape[:4])
    add(_Field("latent dtype", 1, lambda s: _dtype_name(s[0])), [_dtype_code(sample.dtype)])
    timestep = arguments.get("timestep")
    if isinstance(timestep, Tensor) and timestep.numel():
        first: int | Tensor = timestep.detach().reshape(-1)[0].to(device, torch.float64).view(torch.int64)
    elif isinstance(timestep, bool | int | float):
        first = _float_bits(float(timestep))
    else:
        first = _float_bits(math.nan)
    add(_Field("timestep", 3, lambda s: f"{_bits_float(s[0]):g}"), [first, *_group_checksum(timestep, "t", device)])
    add(_Field("latent checksum", 1), [tensor_checksum(sample)])
    for name, label in (
        ("encoder_hidden_states", "encoder_hidden_states (the prompt embeddings)"),
        ("added_cond_kwargs", "added_cond_kwargs (SDXL's text embeddings and time ids, ...)"),
    ):
        add(_Field(label, 2), list(_group_checksum(arguments.get(name), name, device)))
    others = {k: v for k, v in arguments.items() if k not in _ARGUMENTS}
    add(
        _Field(
            "the checksum of the other arguments (ControlNet residuals, class labels, cross_attention_kwargs, ...)", 2
        ),
        list(_group_checksum(others, "", device)),
    )
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        add(_Field(f"PCPPConfig.{item.name}", 1, _show_scalar(value)), [_scalar(value)])
    if len(host) > _LENGTH:
        raise AssertionError(f"the agreement vector needs {len(host)} slots but has {_LENGTH}")
    vector = torch.tensor(host + [0] * (_LENGTH - len(host)), dtype=torch.int64).to(device)
    if on_device:
        slots = torch.tensor([slot for slot, _ in on_device], dtype=torch.int64).to(device)
        vector.index_copy_(0, slots, torch.stack([value.to(device) for _, value in on_device]))
    return fields, vector


def _gather(vector: Tensor, comms: Sequence[PatchCommunicator], what: str) -> Tensor:
    """Every rank's vector, in one (ranks, _LENGTH) matrix that all ranks receive identically: gathered over the
    patch group, then those blocks over the CFG group, so ranks of other patch groups are compared too."""
    block = vector
    for comm in comms:
        out = torch.empty(comm.world_size * block.numel(), dtype=block.dtype, device=block.device)
        comm.all_gather(out, block, what=what).wait()
        block = out
    return block.view(-1, _LENGTH).cpu()


def _describe(field: _Field, rows: list[list[int]], ranks: list[int]) -> str:
    values = [tuple(row) for row in rows]
    if field.show is not None:
        shown = [field.show(v) for v in values]
        if len(set(shown)) > 1:
            return (
                f"{field.label} differs ("
                + ", ".join(f"rank {r}: {s}" for r, s in zip(ranks, shown, strict=True))
                + ")"
            )
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank, value in zip(ranks, values, strict=True):
        groups.setdefault(value, []).append(rank)
    names = [("rank " if len(g) == 1 else "ranks ") + ", ".join(map(str, g)) for g in groups.values()]
    detail = "" if field.show is None else f" (each shows {field.show(values[0])}: dtype, shape or later values differ)"
    return f"{field.label} differs between {', '.join(names[:-1])} and {names[-1]}{detail}"


def check_ranks_agree(
    groups: ParallelGroups | PatchCommunicator, arguments: dict[str, Any], config: PCPPConfig, *, image: int, step: int
) -> None:
    """Raise on every rank unless every rank of ``groups`` called the UNet with the same inputs and settings.

    Each rank reduces its inputs to a fixed-length int64 vector (latent shape, dtype and checksum; the timestep;
    checksums of ``encoder_hidden_states``, ``added_cond_kwargs`` and every other argument; each ``PCPPConfig``
    field) and all vectors are gathered: one or two all-gathers of 512 bytes per rank and one device-to-host copy.
    A no-op on a single rank and while a CUDA graph is being captured. Call it with the UNet's arguments before
    the CFG split (every rank of the CFG group receives the same full batch).

    Args:
        groups: the patch communicator, or the patch and CFG groups (the ranks of all are compared).
        arguments: the UNet's arguments by name (``sample`` a ``(B, C, H, W)`` tensor), as every rank received them.
        config: this rank's pcpp settings.
        image: the index of the image on this rank, for the message.
        step: the step of the image (0 at its start); compared, and named in the message.

    Raises:
        RanksDisagreeError: some rank's vector differs; the message names the ranks and every field that differs.
        PeerTimeoutError: a peer did not reach the check within the communicator's timeout.

    Example:
        >>> import torch, pcpp
        >>> from pcpp.agreement import check_ranks_agree
        >>> check_ranks_agree(pcpp.comm.LocalCommunicator(), {"sample": torch.zeros(1, 4, 8, 8), "timestep": 1},
        ...                   pcpp.PCPPConfig(), image=0, step=0)  # one rank: nothing to compare
    """
    if isinstance(groups, ParallelGroups):
        comms = [groups.patch] + ([groups.cfg] if groups.cfg is not None and groups.cfg_split else [])
    else:
        comms = [groups]
    if math.prod(c.world_size for c in comms) == 1:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return  # a graph would record the collective and replay it against stale inputs; the eager call checked
    what = f"image {image}, step {step}"
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else comms[0].rank
    fields, vector = _fingerprint(arguments, config, step, rank)
    matrix = _gather(vector, comms, f"agreement check of the ranks' inputs ({what})").tolist()
    ranks = [row[0] for row in matrix]
    problems = []
    slot = 0
    for field in fields:
        rows = [row[slot : slot + field.width] for row in matrix]
        if field.label != "rank" and any(r != rows[0] for r in rows):
            problems.append(_describe(field, rows, ranks))
        slot += field.width
    if problems:
        raise RanksDisagreeError(
            f"ranks disagree at the start of an image ({what}): {'; '.join(problems)} — every rank must call the "
            "pipeline with the same prompt, seed (generator), size, steps, scheduler and pcpp settings."
        )
