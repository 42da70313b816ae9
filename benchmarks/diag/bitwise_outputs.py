"""Diagnostic: converted UNets' outputs, messages and byte counts, saved or compared bitwise against a saved run.

A refactor of pcpp's core must not change a single bit of what a converted UNet computes, nor which messages
every rank posts, in which order, with which tags and sizes. This script runs a set of small CPU cases through
the public API (random-weight UNets of the test shapes, several ranks on gloo, warmup crossing into the
asynchronous phase) and records, per case and rank: every step's guided noise prediction and the final latent,
every point-to-point batch and all-gather the patch communicator was asked to post, and the per-step byte counts
of :func:`pcpp.comm_stats`.

Run it once with the code before a change and once with the code after, then compare::

    PYTHONPATH=/tmp/pcpp-base/src python benchmarks/diag/bitwise_outputs.py save /tmp/bitwise_base.pt
    PYTHONPATH=$PWD/src python benchmarks/diag/bitwise_outputs.py save /tmp/bitwise_new.pt
    python benchmarks/diag/bitwise_outputs.py compare /tmp/bitwise_base.pt /tmp/bitwise_new.pt

``compare`` exits with status 1 and names every difference (``torch.equal`` on every tensor, ``==`` on logs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor

LOG = logging.getLogger("bitwise_outputs")


@dataclass(frozen=True)
class Case:
    """One converted loop: model family, latent size, ranks, conversion settings."""

    name: str
    world: int
    family: str = "tiny"
    height: int = 16
    width: int = 12
    steps: int = 5
    guidance: bool = True
    cfg_split: bool = False
    fuse_qkv: bool = False
    compile_backend: str | None = None
    images: int = 1  # loops through one conversion (reset between them)
    convert: dict[str, Any] = field(default_factory=dict)
    second: dict[str, Any] = field(default_factory=dict)  # pcpp.configure(...) before the second image


def _cases() -> list[Case]:
    full = {"conditioning": "FULL"}
    return [
        Case("sdxl-2-partial", 2, "sdxl", height=16, steps=5, convert={"warmup_steps": 2, "partial": 0.3}),
        Case("sdxl-2-exact", 2, "sdxl", height=16, steps=3, convert={"exact": True}),
        Case("sdxl-3-uneven-partial", 3, "sdxl", height=20, steps=5, convert={"warmup_steps": 2, "partial": 0.3}),
        Case("sdxl-3-uneven-full", 3, "sdxl", height=20, steps=5, convert={"warmup_steps": 2, **full}),
        Case("sd15-2-uneven-full", 2, "sd15", height=24, width=16, steps=4, convert={"warmup_steps": 2, **full}),
        Case(
            "tiny-2-two-images-configure",
            2,
            steps=4,
            images=2,
            convert={"warmup_steps": 2, "partial": 0.5},
            second={"partial": 1.0, "warmup_steps": 1},
        ),
        Case("tiny-3-batched", 3, height=24, steps=5, convert={"warmup_steps": 2, "partial": 0.5, "exchange_batch": 3}),
        Case("tiny-3-partial0", 3, height=24, steps=4, convert={"warmup_steps": 1, "partial": 0.0}),
        Case("tiny-2-fused-qkv", 2, steps=4, fuse_qkv=True, convert={"warmup_steps": 2, "partial": 0.5}),
        Case("unet2d-2-full", 2, "unet2d", height=20, guidance=False, steps=4, convert={"warmup_steps": 2, **full}),
        Case("tiny-4-cfg-split", 4, height=16, steps=4, cfg_split=True, convert={"warmup_steps": 2, "partial": 0.3}),
        Case(
            "tiny-2-compiled-aot-eager",
            2,
            steps=4,
            compile_backend="aot_eager",
            convert={"warmup_steps": 2, "partial": 0.5},
        ),
    ]


class RecordingComm:
    """Hands every operation to ``inner`` and records it: ``("p2p", [(peer, send, tag, numel), ...])`` per batch,
    ``("gather", output numel, input numel)`` per all-gather."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.log: list[Any] = []

    @property
    def rank(self) -> int:
        return int(self.inner.rank)

    @property
    def world_size(self) -> int:
        return int(self.inner.world_size)

    @property
    def timeout(self) -> Any:
        return self.inner.timeout

    @timeout.setter
    def timeout(self, value: Any) -> None:
        self.inner.timeout = value

    def send_recv(self, messages: Any, *, what: str) -> Any:
        self.log.append(("p2p", [(m.peer, m.send, m.tag, m.tensor.numel()) for m in messages]))
        return self.inner.send_recv(messages, what=what)

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> Any:
        self.log.append(("gather", output.numel(), tensor.numel()))
        return self.inner.all_gather(output, tensor, what=what)


def _build(case: Case) -> Any:
    from pcpp.testing import tiny_unet_config

    torch.manual_seed(0)
    config = tiny_unet_config(case.family)
    model: Any = UNet2DModel(**config) if case.family == "unet2d" else UNet2DConditionModel(**config)
    if case.fuse_qkv:
        model.fuse_qkv_projections()
    return model.eval()


def _inputs(case: Case, unet: Any) -> tuple[Tensor, dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    config: Any = unet.config
    x = torch.randn(1, config.in_channels, case.height, case.width, generator=gen)
    kwargs: dict[str, Any] = {}
    batch = 2 if case.guidance else 1
    if isinstance(unet, UNet2DConditionModel):
        kwargs["encoder_hidden_states"] = torch.randn(batch, 5, config.cross_attention_dim, generator=gen)
        if config.addition_embed_type == "text_time":
            text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, text_dim, generator=gen),
                "time_ids": torch.randn(batch, 6, generator=gen),
            }
    return x, kwargs


def _groups(case: Case, world: int) -> tuple[Any, RecordingComm]:
    from pcpp.comm import ParallelGroups, TorchCommunicator

    if not case.cfg_split:
        recording = RecordingComm(TorchCommunicator())
        return recording, recording
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("cfg", "patch"))
    recording = RecordingComm(TorchCommunicator(mesh.get_group("patch")))
    cfg = TorchCommunicator(mesh.get_group("cfg"))
    return ParallelGroups(patch=recording, cfg=cfg), recording


def _run_case(case: Case, world: int) -> dict[str, Any]:
    import pcpp

    unet = _build(case)
    comm, recording = _groups(case, world)
    settings = dict(case.convert)
    if "conditioning" in settings:
        settings["conditioning"] = pcpp.Conditioning[settings["conditioning"]]
    pcpp.convert(unet, comm=comm, **settings)
    model: Any = unet
    if case.compile_backend is not None:
        torch._dynamo.reset()
        model = torch.compile(unet, backend=case.compile_backend, dynamic=False)
    x0, kwargs = _inputs(case, unet)
    scheduler: Any = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    images = []
    for image in range(case.images):
        if image:
            pcpp.configure(unet, **case.second)
        scheduler.set_timesteps(case.steps)
        x, eps_all = x0.clone(), []
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = model(torch.cat([x, x]) if case.guidance else x, t, **kwargs).sample
                if case.guidance:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + 5.0 * (cond - uncond)
                eps_all.append(eps)
                x = scheduler.step(eps, t, x).prev_sample
        images.append({"eps": eps_all, "x": x})
    stats = [
        (s.image, s.step, s.phase, sorted((k.value, v.sent, v.received) for k, v in s.by_kind.items()))
        for s in pcpp.comm_stats(unet).steps
    ]
    if case.compile_backend is not None:
        torch._dynamo.reset()
    return {"images": images, "messages": recording.log, "stats": stats}


def worker(rank: int, world: int, cases: list[Case]) -> dict[str, Any]:
    """Every case of this world size, in order, on one rank."""
    torch.use_deterministic_algorithms(True)
    return {case.name: _run_case(case, world) for case in cases}


def save(path: str) -> None:
    """Run every case and save ``{case: [rank results]}`` to ``path``."""
    import pcpp
    from pcpp.testing import run_distributed

    LOG.info("pcpp from %s", pcpp.__file__)
    by_world: dict[int, list[Case]] = {}
    for case in _cases():
        by_world.setdefault(case.world, []).append(case)
    results: dict[str, list[Any]] = {}
    for world, cases in sorted(by_world.items()):
        LOG.info("world %d: %s", world, ", ".join(c.name for c in cases))
        per_rank = run_distributed(worker, world, cases, timeout=1800, group_timeout=600)
        for case in cases:
            results[case.name] = [per_rank[r][case.name] for r in range(world)]
    torch.save(results, path)
    LOG.info("saved %d cases to %s", len(results), path)


def _differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return [f"{where}: tensor against {type(b).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: shape/dtype {tuple(a.shape)} {a.dtype} against {tuple(b.shape)} {b.dtype}"]
        if not torch.equal(a, b):
            err = float((a.double() - b.double()).abs().max())
            return [f"{where}: values differ (max abs {err:.3g})"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} against {sorted(b)}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} against {b!r}"]


def _is_checksum_gather(entry: Any) -> bool:
    """The agreement check's all-gather (``pcpp.agreement``: 8 int64 words per rank at steps 0 and 1), as logged:
    ``("gather", output bytes, 64)``; no layer of these cases gathers 64 bytes."""
    return entry[0] == "gather" and entry[2] == 64


def _normalised(messages: list[Any]) -> list[Any]:
    """``messages`` without the agreement check's all-gathers, with tags renumbered by first appearance."""
    tags: dict[int, int] = {}
    out: list[Any] = []
    for entry in messages:
        if entry[0] == "gather":
            if not _is_checksum_gather(entry):
                out.append(entry)
            continue
        out.append(("p2p", [(peer, send, tags.setdefault(tag, len(tags)), size) for peer, send, tag, size in entry[1]]))
    return out


def _without_agreement(runs: dict[str, Any]) -> dict[str, Any]:
    return {
        case: [{**rank, "messages": _normalised(rank["messages"])} for rank in ranks] for case, ranks in runs.items()
    }


def compare(base_path: str, new_path: str, *, ignore_agreement: bool = False) -> int:
    """Compare two saved runs; returns the exit status (0: bitwise equal everywhere).

    With ``ignore_agreement``, both runs' message logs drop the agreement check's all-gathers (added after
    b6d5b4f by the ranks-agree check) and have their tags renumbered in order of first use (converting more
    module kinds, e.g. FreeU's up blocks, shifts every later layer's tag); outputs and byte counts are still compared
    bitwise.
    """
    base = torch.load(base_path, weights_only=False)
    new = torch.load(new_path, weights_only=False)
    if ignore_agreement:
        base, new = _without_agreement(base), _without_agreement(new)
    problems = _differences(base, new, "")
    tensors = sum(len(image["eps"]) + 1 for ranks in base.values() for rank in ranks for image in rank["images"])
    posts = sum(len(rank["messages"]) for ranks in base.values() for rank in ranks)
    for problem in problems:
        LOG.error("%s", problem)
    LOG.info(
        "%d cases, %d output tensors, %d communicator posts compared: %s",
        len(base),
        tensors,
        posts,
        "all bitwise equal" if not problems else f"{len(problems)} differences",
    )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("save", help="run every case and save the results").add_argument("path")
    cmp = sub.add_parser("compare", help="compare two saved runs bitwise")
    cmp.add_argument("base")
    cmp.add_argument("new")
    cmp.add_argument(
        "--ignore-agreement",
        action="store_true",
        help="drop the agreement check's all-gathers and renumber tags by first use before comparing messages",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.mode == "save":
        save(args.path)
        return 0
    return compare(args.base, args.new, ignore_agreement=args.ignore_agreement)


if __name__ == "__main__":
    sys.exit(main())
