"""Per-rank functions for the distributed tests. They run in spawned processes, so they live at module level."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor

import pcpp
from pcpp.exchange import Transfer
from pcpp.layers._common import PatchLayer
from pcpp.testing import tiny_unet_config


@dataclass(frozen=True)
class Case:
    """One UNet run: model family, layout and sampling settings."""

    family: str = "tiny"
    cfg_split: bool = False
    images: int = 1  # images per call; with guidance the UNet batch is twice this
    height: int = 16
    width: int = 12
    steps: int = 5
    guidance: float | None = 5.0
    seed: int = 0
    convert: dict[str, Any] = field(default_factory=dict)
    fuse_qkv: bool = False  # diffusers' fuse_qkv_projections() before converting


def build_unet(case: Case) -> UNet2DConditionModel | UNet2DModel:
    torch.manual_seed(case.seed)
    config = tiny_unet_config(case.family)
    model = UNet2DModel(**config) if case.family == "unet2d" else UNet2DConditionModel(**config)
    if case.fuse_qkv:
        model.fuse_qkv_projections()
    return model.eval()


def inputs(case: Case, unet: UNet2DConditionModel | UNet2DModel) -> tuple[Tensor, dict[str, Any]]:
    """The initial latent and the conditioning kwargs of one UNet call (CFG batch included)."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    channels = unet.config.in_channels
    x = torch.randn(case.images, channels, case.height, case.width, generator=gen)
    kwargs: dict[str, Any] = {}
    batch = case.images * (2 if case.guidance is not None else 1)
    if isinstance(unet, UNet2DConditionModel):
        kwargs["encoder_hidden_states"] = torch.randn(batch, 5, unet.config.cross_attention_dim, generator=gen)
        if unet.config.addition_embed_type == "text_time":
            text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, text_dim, generator=gen),
                "time_ids": torch.randn(batch, 6, generator=gen),
            }
    return x, kwargs


def ddim_loop(unet: torch.nn.Module, case: Case, model: Any = None) -> tuple[Tensor, list[Tensor]]:
    """A DDIM loop with classifier-free guidance; returns the final latent and every step's guided noise.

    ``model`` is what is called (e.g. ``torch.compile(unet)``); ``unet`` by default.
    """
    model = unet if model is None else model
    x, kwargs = inputs(case, unet)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    scheduler.set_timesteps(case.steps)
    eps_all = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            batch_in = torch.cat([x, x]) if case.guidance is not None else x
            eps = model(batch_in, t, **kwargs).sample
            if case.guidance is not None:
                uncond, cond = eps.chunk(2)
                eps = uncond + case.guidance * (cond - uncond)
            eps_all.append(eps)
            x = scheduler.step(eps, t, x).prev_sample
    return x, eps_all


def comm_for(case: Case, world: int, device: str = "cpu") -> Any:
    """The default group, or a ("cfg", "patch") mesh when the case splits the CFG batch."""
    if not case.cfg_split:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device, (2, world // 2), mesh_dim_names=("cfg", "patch"))


def loop_vs_reference(rank: int, world: int, case: Case) -> dict[str, Any]:
    """Single-device loop and converted loop on the same rank; returns both."""
    unet = build_unet(case)
    ref_x, ref_eps = ddim_loop(unet, case)
    pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
    x, eps = ddim_loop(unet, case)
    return {"ref_x": ref_x, "ref_eps": ref_eps, "x": x, "eps": eps}


def repeated_input(rank: int, world: int, case: Case, repeats: int) -> dict[str, Any]:
    """Call the converted UNet ``repeats`` times with the same input and timestep (a fixed point)."""
    unet = build_unet(case)
    x, kwargs = inputs(case, unet)
    batch_in = torch.cat([x, x]) if case.guidance is not None else x
    with torch.no_grad():
        ref = unet(batch_in, 500, **kwargs).sample
        pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
        outs = [unet(batch_in, 500, **kwargs).sample for _ in range(repeats)]
    phases = [s.phase for s in pcpp.comm_stats(unet).steps]
    return {"ref": ref, "outs": outs, "phases": phases}


def traffic(rank: int, world: int, case: Case) -> dict[str, Any]:
    """Run a loop and return per-step traffic plus what each attention layer saw (for analytic counts)."""
    unet = build_unet(case)
    pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
    seen: list[tuple[str, int, int, int]] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hs = args[0]
        if kwargs.get("encoder_hidden_states") is None and (len(args) < 2 or args[1] is None):
            seen.append((module.pcpp_name, hs.shape[0], hs.shape[1], module.to_k.out_features))

    widths: dict[int, int] = {}  # strip height -> activation width, as the convs produce them

    def record_width(module: Any, args: Any, out: Tensor) -> None:
        widths[out.shape[2]] = out.shape[3]

    for module in unet.modules():
        if isinstance(module, pcpp.layers.PartialPatchAttention):
            module.register_forward_pre_hook(record, with_kwargs=True)
        if isinstance(module, pcpp.layers.PartialPatchConv2d):
            module.register_forward_hook(record_width)
    ddim_loop(unet, case)
    ctx = pcpp.get_context(unet)
    geo = ctx.geometry
    steps = [
        {"step": s.step, "phase": s.phase, "by_kind": {k.value: (v.sent, v.received) for k, v in s.by_kind.items()}}
        for s in ctx.stats.steps
    ]
    return {"steps": steps, "seen": seen, "rows": geo.rows if geo else None, "widths": widths}


def two_images(rank: int, world: int, case: Case, other: Case) -> dict[str, Any]:
    """Image ``other`` then image ``case`` through one converted UNet, and ``case`` alone through a fresh one."""
    unet = build_unet(case)
    pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
    ddim_loop(unet, other)
    after_x, after_eps = ddim_loop(unet, case)
    images = pcpp.get_context(unet).image
    fresh = build_unet(case)
    pcpp.convert(fresh, comm=comm_for(case, world), **case.convert)
    alone_x, alone_eps = ddim_loop(fresh, case)
    return {"after": after_eps, "alone": alone_eps, "images": images}


def one_rank_skips(rank: int, world: int, case: Case) -> str:
    """Rank 1 never calls the UNet but stays in the group; rank 0 must fail with PeerTimeoutError, not hang.

    (A rank that leaves the group instead closes its connections: that is PeerFailedError, tests/test_faults.py.)
    """
    unet = build_unet(case)
    pcpp.convert(unet, timeout=timedelta(seconds=2), **case.convert)
    if rank == 1:
        time.sleep(6)  # silent, but present, past rank 0's 2 s timeout
        return "skipped"
    x, kwargs = inputs(case, unet)
    try:
        with torch.no_grad():
            unet(torch.cat([x, x]), 10, **kwargs)
    except pcpp.PeerTimeoutError as err:
        return f"timeout: {err}"
    return "no error"


# ----------------------------------------------------------------------------------------------------------------
# Layer-level workers: the parallel layers on their own, against full-image references computed on every rank.


def _layer_context(config: pcpp.PCPPConfig, height: int, width: int, levels: int = 0) -> pcpp.PatchContext:
    comm = pcpp.comm.TorchCommunicator()
    return pcpp.PatchContext(config, comm, unit=2**levels, levels=levels)


def _own(t: Tensor, ctx: pcpp.PatchContext, dim: int = 2) -> Tensor:
    geo = ctx.geometry
    assert geo is not None
    start = geo.strip_start(ctx.patch.rank, 0)
    return t.narrow(dim, start, geo.rows[ctx.patch.rank])


def _three_steps(
    ctx: pcpp.PatchContext, layer: torch.nn.Module, shape: tuple[int, int, int, int]
) -> tuple[list[Tensor], list[Tensor], tuple[int, ...]]:
    """Three whole frames of ``shape`` (seeded), each one step of ``layer`` on this rank's rows: the frames, the
    layer's outputs and every strip's rows."""
    gen = torch.Generator().manual_seed(1)
    frames = [torch.randn(*shape, generator=gen) for _ in range(3)]
    outs = []
    for x in frames:
        ctx.begin_step(shape[2], shape[3], None)
        outs.append(layer(_own(x, ctx)))
        ctx.end_step()
    geo = ctx.geometry
    assert geo is not None
    return frames, outs, geo.rows


def conv_staleness(rank: int, world: int, height: int) -> dict[str, Any]:
    """A 3x3 conv over steps a (sync), b, c (async): step b's halo is a's rows, step c's is b's."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    ctx = _layer_context(pcpp.PCPPConfig(warmup_steps=1), height, 6)
    layer = pcpp.layers.PartialPatchConv2d.from_conv(conv, ctx, name="conv")
    frames, outs, rows = _three_steps(ctx, layer, (2, 3, height, 6))
    return {"outs": outs, "frames": frames, "rows": rows, "weight": conv.weight, "bias": conv.bias}


def attention_staleness(rank: int, world: int, height: int, partial: float, full: bool) -> dict[str, Any]:
    """Self-attention over steps a (sync), b, c (async); returns outputs and the inputs for a reference."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4).eval()
    conditioning = pcpp.Conditioning.FULL if full else pcpp.Conditioning.PARTIAL
    ctx = _layer_context(pcpp.PCPPConfig(warmup_steps=1, partial=partial, conditioning=conditioning), height, 3)
    layer = pcpp.layers.PartialPatchAttention.from_attention(attn, ctx, name="attn")
    gen = torch.Generator().manual_seed(1)
    frames = [torch.randn(2, 8, height, 3, generator=gen) for _ in range(3)]
    outs = []
    with torch.no_grad():
        for x in frames:
            ctx.begin_step(height, 3, None)
            outs.append(layer(_own(x, ctx)))
            ctx.end_step()
    geo = ctx.geometry
    assert geo is not None
    sent = [s.by_kind.get(pcpp.LayerKind.ATTENTION) for s in ctx.stats.steps]
    return {
        "outs": outs,
        "frames": frames,
        "rows": geo.rows,
        "state": attn.state_dict(),
        "sent": [(t.sent, t.received) if t else (0, 0) for t in sent],
    }


def groupnorm_staleness(rank: int, world: int, height: int) -> dict[str, Any]:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(2, 4)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    ctx = _layer_context(pcpp.PCPPConfig(warmup_steps=1), height, 5)
    layer = pcpp.layers.AsyncGroupNorm.from_group_norm(norm, ctx, name="norm")
    gen = torch.Generator().manual_seed(1)
    frames = [torch.randn(2, 4, height, 5, generator=gen) * (1 + i) + i for i in range(3)]
    outs = []
    for x in frames:
        ctx.begin_step(height, 5, None)
        outs.append(layer(_own(x, ctx)))
        ctx.end_step()
    geo = ctx.geometry
    assert geo is not None
    return {"outs": outs, "frames": frames, "rows": geo.rows, "weight": norm.weight, "bias": norm.bias}


class ShiftDown(PatchLayer, torch.nn.Module):
    """The smallest complete parallel layer (docs/design.md): ``y[:, :, i] = x[:, :, i - 1]``, zeros at the top.

    Each strip needs the last row of the strip above: it states that it sends its own last row down and reads
    the row from above into a buffer, and the exchange protocol does the rest (this step's row in synchronous
    steps, the previous step's after warmup).
    """

    def __init__(self, context: pcpp.PatchContext, name: str = "shift") -> None:
        super().__init__()
        self.attach(context, name, pcpp.LayerKind.CONV)

    def forward(self, x: Tensor) -> Tensor:
        port = self.port
        top = port.buffer("above", (x.shape[0], x.shape[1], 1, x.shape[3]), x, zeros=True)  # zeros on rank 0
        send = x[:, :, -1:] if port.rank + 1 < port.world_size else None
        recv = top if port.rank > 0 else None
        return port.run(
            lambda: Transfer("last row", port.neighbours(send_down=send, recv_up=recv)),
            # Read inside ``read``: after it returns, an asynchronous step's receive may overwrite ``top``.
            lambda: torch.cat([top, x[:, :, :-1]], dim=2),
        )


def shift_staleness(rank: int, world: int, height: int) -> dict[str, Any]:
    """:class:`ShiftDown` over steps a (sync), b, c (async)."""
    ctx = _layer_context(pcpp.PCPPConfig(warmup_steps=1), height, 3)
    layer = ShiftDown(ctx)
    frames, outs, rows = _three_steps(ctx, layer, (1, 2, height, 3))
    sent = [s.by_kind[pcpp.LayerKind.CONV].sent for s in ctx.stats.steps]
    return {"outs": outs, "frames": frames, "rows": rows, "sent": sent}


def two_modes(rank: int, world: int, first: Case, second: Case) -> dict[str, Any]:
    """The same loop through two conversions of the same UNet weights."""
    results = {}
    for key, case in (("first", first), ("second", second)):
        unet = build_unet(case)
        pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
        results[key] = ddim_loop(unet, case)[1]
    return results


def many_loops(rank: int, world: int, cases: list[Case]) -> list[dict[str, float]]:
    """``loop_vs_reference`` for several cases in one process group; returns relative errors only."""
    report = []
    for case in cases:
        r = loop_vs_reference(rank, world, case)
        eps_err = max(float((a - b).norm() / b.norm()) for a, b in zip(r["eps"], r["ref_eps"], strict=True))
        report.append({"x": float((r["x"] - r["ref_x"]).norm() / r["ref_x"].norm()), "eps": eps_err})
    return report


def graphs_vs_eager(rank: int, world: int, case: Case, compile_: bool) -> dict[str, Any]:
    """On CUDA: the same DDIM loop eager, from CUDA graphs, and (optionally) compiled under graphs.

    With ``compile_`` it also runs the unconverted UNet eager and compiled under graphs on this rank alone
    ("plain_eager", "plain_compiled"): how far Inductor's own reordering moves the trajectory, the yardstick
    for the converted UNet's compiled run.
    """
    from pcpp.cuda_graph import CUDAGraphUNet

    device = torch.device("cuda", rank)
    results: dict[str, Any] = {}
    variants = ["eager", "graphs"] + (["compiled", "plain_eager", "plain_compiled"] if compile_ else [])
    for variant in variants:
        unet = build_unet(case).to(device)
        if not variant.startswith("plain"):
            pcpp.convert(unet, comm=comm_for(case, world, "cuda"), detect_new_image=False, **case.convert)
        runner: Any = unet
        if variant not in ("eager", "plain_eager"):
            # torch.compile of a module returns a module (an OptimizedModule); its annotation says only Callable.
            compiled = cast(torch.nn.Module, torch.compile(unet)) if variant.endswith("compiled") else unet
            runner = CUDAGraphUNet(compiled)
        x, kwargs = inputs(case, unet)
        x = x.to(device)
        kwargs = {
            k: (v.to(device) if isinstance(v, Tensor) else {a: b.to(device) for a, b in v.items()})
            for k, v in kwargs.items()
        }
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
        scheduler.set_timesteps(case.steps, device=device)
        eps_all = []
        for image in range(2):  # the second image replays the graphs captured during the first
            if not variant.startswith("plain"):
                pcpp.reset(unet)
            xi = x.clone()
            with torch.no_grad():
                for t in scheduler.timesteps:
                    out = runner(torch.cat([xi, xi]), t, **kwargs)
                    eps = out if isinstance(out, Tensor) else out.sample
                    uncond, cond = eps.chunk(2)
                    eps = uncond + 5.0 * (cond - uncond)
                    if image == 1:
                        eps_all.append(eps.cpu())
                    xi = scheduler.step(eps, t, xi).prev_sample
        results[variant] = eps_all
        if isinstance(runner, CUDAGraphUNet):
            runner.release()
        torch._dynamo.reset()
    return results


def resolution_change(rank: int, world: int, cases: list[Case]) -> list[float]:
    """One converted UNet runs loops at several resolutions in turn; relative error of each against the plain UNet."""
    unet = build_unet(cases[0])
    plain = build_unet(cases[0])
    pcpp.convert(unet, comm=comm_for(cases[0], world), **cases[0].convert)
    errors = []
    for case in cases:
        ref_x, _ = ddim_loop(plain, case)
        x, _ = ddim_loop(unet, case)
        errors.append(float((x - ref_x).norm() / ref_x.norm()))
    return errors


def attention_buffers(rank: int, world: int, case: Case) -> list[dict[str, tuple[int, ...]]]:
    """Run a loop; return the buffers (name: shape) each self-attention layer keeps afterwards."""
    unet = build_unet(case)
    pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
    ddim_loop(unet, case)
    return [m.port.buffer_shapes() for m in unet.modules() if isinstance(m, pcpp.layers.PartialPatchAttention)]


def compiled_vs_eager(rank: int, world: int, case: Case, backend: str) -> dict[str, Any]:
    """The same loop under ``torch.compile`` (two images, the second reusing the compiled graphs), then eager.

    The compiled loops come first, on a UNet that has never run: state that layers fill in lazily on their first
    call would then be traced, and Dynamo's guards on it would fail on the second call (a recompile, which under
    CUDA-graph capture is an error).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    unet = build_unet(case)
    pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
    compiled = torch.compile(unet, backend=backend, dynamic=False)
    finals = []
    for _ in range(2):
        pcpp.reset(unet)
        finals.append(ddim_loop(unet, case, compiled)[0])
    pcpp.reset(unet)
    eager_x, _ = ddim_loop(unet, case)
    return {
        "eager": eager_x,
        "compiled": finals,
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }


def compiled_sizes(rank: int, world: int, case: Case, sizes: list[tuple[int, int]]) -> list[float]:
    """One ``torch.compile`` of a converted UNet (default dynamic shapes) runs loops at several latent sizes in
    turn; relative error of each final latent against the same loop run eagerly."""
    import dataclasses

    torch._dynamo.reset()
    unet = build_unet(case)
    pcpp.convert(unet, comm=comm_for(case, world), **case.convert)
    compiled = torch.compile(unet)
    errors = []
    for height, width in sizes:
        sized = dataclasses.replace(case, height=height, width=width)
        ref, _ = ddim_loop(unet, sized)
        got, _ = ddim_loop(unet, sized, compiled)
        errors.append(float((got - ref).norm() / ref.norm()))
    return errors


class RecordingComm:
    """A communicator that records every point-to-point message it posts (peer, direction, tag, elements) and
    hands the work to ``inner``; NCCL matches messages by order, so the records of two ranks must pair up."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.posts: list[list[tuple[int, bool, int, int]]] = []

    @property
    def rank(self) -> int:
        return int(self.inner.rank)

    @property
    def world_size(self) -> int:
        return int(self.inner.world_size)

    def send_recv(self, messages: Any, *, what: str) -> Any:
        self.posts.append([(m.peer, m.send, m.tag, m.tensor.numel()) for m in messages])
        return self.inner.send_recv(messages, what=what)

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> Any:
        return self.inner.all_gather(output, tensor, what=what)


def message_log(rank: int, world: int, case: Case) -> list[list[tuple[int, bool, int, int]]]:
    """The point-to-point posts of one loop of ``case`` (no CFG split), through :class:`RecordingComm`."""
    from pcpp.comm import TorchCommunicator

    unet = build_unet(case)
    comm = RecordingComm(TorchCommunicator())
    pcpp.convert(unet, comm=comm, **case.convert)
    ddim_loop(unet, case)
    return comm.posts
