"""Diagnostic: what moving a step's exchanges costs the compute beside it, by transport.

pcpp's asynchronous steps post one small exchange per layer on a side stream while the next layers compute
(docs/benchmarks.md, table 10b: 156 per SDXL step, 2.8-6.3 ms of NCCL kernel time per step). NCCL moves the data
with kernels that hold SMs until the peer arrives. A copy engine moves it without SMs: with the receive buffers in
symmetric memory (``torch.distributed._symmetric_memory``), the sender copies its rows straight into the
neighbour's buffer (``cudaMemcpyAsync`` to a peer address), which is what torch's own "low-contention" collectives
do. This emulates one step of a rank: ``--layers`` layers, each ``--gemms`` matrix multiplications of
``M x K @ K x N`` then an exchange of ``--kib`` KiB with each neighbour, on a side stream, all joined at the step's
end. Transports:

* ``none``: the layers alone (the floor);
* ``nccl``: ``batch_isend_irecv`` per layer, as pcpp does now;
* ``copy-engine``: a peer copy per layer into the neighbour's symmetric buffer, then one barrier per step (the
  step-end all-gather of the outputs plays that part in pcpp).

It reports the median step time of each, and the copy engine's data checked at the receiver. Run on 2 GPUs or
more of one host (NVLink), from the repository root::

    NCCL_NVLS_ENABLE=0 OUT=results torchrun --standalone --nproc-per-node 2 benchmarks/diag/transport.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LOG = logging.getLogger("transport")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=156, help="exchanges per step (SDXL: 156)")
    parser.add_argument("--gemms", type=int, default=4, help="matrix multiplications per layer")
    parser.add_argument("--shape", type=int, nargs=3, default=[1024, 1280, 1280], metavar=("M", "K", "N"))
    parser.add_argument("--kib", type=float, nargs="+", default=[64.0, 1024.0], help="KiB sent to each neighbour")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per transport and size")
    parser.add_argument("--transports", nargs="+", default=["none", "nccl", "copy-engine"])
    return parser.parse_args()


class Step:
    """One emulated step: compute on the current stream, exchanges on a side stream, joined at the end."""

    def __init__(self, args: argparse.Namespace, kib: float, device: torch.device) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        self.neighbours = [p for p in (rank - 1, rank + 1) if 0 <= p < world]
        m, k, n = args.shape
        self.a = torch.randn(m, k, device=device, dtype=torch.float16)
        self.w = torch.randn(k, n, device=device, dtype=torch.float16) / k**0.5
        self.out = torch.empty(m, n, device=device, dtype=torch.float16)
        self.layers, self.gemms = args.layers, args.gemms
        self.numel = max(1, int(kib * 1024) // 2)
        self.side = torch.cuda.Stream(device)
        # Per layer and neighbour: what is sent, and where the neighbour's data lands (double-buffered by step
        # parity, so that a step never writes what the neighbour may still read from the step before).
        self.send = torch.full((self.layers, self.numel), float(rank), device=device, dtype=torch.float16)
        self.recv = torch.empty((2, len(self.neighbours), self.layers, self.numel), device=device, dtype=torch.float16)
        self.symm: Any = None
        self.parity = 0

    def run(self, post: Callable[[int], None] | None) -> None:
        for layer in range(self.layers):
            for _ in range(self.gemms):
                torch.mm(self.a, self.w, out=self.out)
            if post is not None:
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    post(layer)
        torch.cuda.current_stream().wait_stream(self.side)
        self.parity ^= 1

    # ---- transports

    def nccl(self, layer: int) -> None:
        ops = []
        for j, peer in enumerate(self.neighbours):
            ops.append(dist.P2POp(dist.irecv, self.recv[self.parity, j, layer], peer))
            ops.append(dist.P2POp(dist.isend, self.send[layer], peer))
        for work in dist.batch_isend_irecv(ops):
            work.wait()  # makes the side stream wait; the host does not block

    def setup_copy_engine(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        shape = (2, 2, self.layers, self.numel)  # parity, sender is above (0) or below (1), layer, data
        world = dist.group.WORLD
        if world is None:
            raise RuntimeError("the default process group is not initialised")
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required by some torch versions, a no-op in others
            symm_mem.enable_symm_mem_for_group(world.group_name)
        buf = symm_mem.empty(shape, dtype=torch.float16, device=self.send.device)
        self.symm = (buf, symm_mem.rendezvous(buf, world))

    def copy_engine(self, layer: int) -> None:
        rank = dist.get_rank()
        _buf, handle = self.symm
        for peer in self.neighbours:
            slot = 0 if peer > rank else 1  # in the peer's buffer: data from above is slot 0
            remote = handle.get_buffer(peer, (2, 2, self.layers, self.numel), torch.float16)
            remote[self.parity, slot, layer].copy_(self.send[layer])

    def end_copy_engine_step(self) -> None:
        _buf, handle = self.symm
        handle.barrier(channel=0, timeout_ms=60_000)


def time_steps(step: Step, transport: str, steps: int) -> list[float]:
    post = {"none": None, "nccl": step.nccl, "copy-engine": step.copy_engine}[transport]
    times = []
    for i in range(steps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.run(post)
        if transport == "copy-engine":
            step.end_copy_engine_step()
        end.record()
        end.synchronize()
        dist.barrier()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return times


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=2))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "world_size": dist.get_world_size(),
        "settings": vars(args),
        "results": [],
    }
    for kib in args.kib:
        step = Step(args, kib, device)
        transports = list(args.transports)
        if "copy-engine" in transports:
            try:
                step.setup_copy_engine()
            except Exception as err:  # symmetric memory unavailable here: time the others
                LOG.exception("symmetric memory set-up failed")
                report["results"].append({"kib": kib, "transport": "copy-engine", "error": repr(err)})
                transports.remove("copy-engine")
        for transport in transports:
            try:
                times = time_steps(step, transport, args.steps)
            except Exception as err:  # report and go on: one transport failing says something too
                LOG.exception("%s at %s KiB failed", transport, kib)
                report["results"].append({"kib": kib, "transport": transport, "error": repr(err)})
                continue
            row: dict[str, Any] = {"kib": kib, "transport": transport, "median_ms": statistics.median(times)}
            if transport == "copy-engine":
                # After the last step's barrier, each slot holds the sender's rank (what it sent).
                buf = step.symm[0]
                rank = dist.get_rank()
                got = {
                    peer: buf[step.parity ^ 1, 0 if peer < rank else 1].float().unique().tolist()
                    for peer in step.neighbours
                }
                row["received_ok"] = all(values == [float(peer)] for peer, values in got.items())
            if transport == "nccl":
                got = {j: step.recv[step.parity ^ 1, j].float().unique().tolist() for j in range(len(step.neighbours))}
                row["received_ok"] = all(v == [float(p)] for v, p in zip(got.values(), step.neighbours, strict=True))
            per_rank: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, row)
            row["per_rank_median_ms"] = [r["median_ms"] for r in per_rank]
            row["received_ok"] = all(r.get("received_ok", True) for r in per_rank)
            LOG.info("%s", row)
            report["results"].append(row)
        del step
        torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        path = Path(os.environ.get("OUT", ".")) / "transport.json"
        path.write_text(json.dumps(report, indent=1))
        LOG.info("wrote %s", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
