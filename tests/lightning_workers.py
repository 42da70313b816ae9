"""Scripts the Lightning tests launch: Lightning starts the other ranks by running this file again.

``python tests/lightning_workers.py trainer|fabric --records R.json --folder OUT --log LOG --devices N --patch P
[--cfg C] [--tensor-parallel T]`` makes the records' images with the tiny model and writes, per rank, a JSON log
of what that rank generated (its global rank, its data-parallel and image-group ranks, the file stems it made).
``--tensor-parallel`` overrides the strategy's size (to test a mesh that does not match the layout).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader


def _records(path: str) -> list:
    from pcpp.lightning import PromptRecord

    return [PromptRecord(**fields) for fields in json.loads(Path(path).read_text())]


def _log(args: argparse.Namespace, mesh: object, made: list[str]) -> None:
    rank = int(torch.distributed.get_rank())
    entry = {
        "rank": rank,
        "data_parallel_rank": int(mesh.get_local_rank("data_parallel")),  # type: ignore[attr-defined]
        "group_rank": int(mesh.get_local_rank("tensor_parallel")),  # type: ignore[attr-defined]
        "made": made,
    }
    Path(args.log).mkdir(parents=True, exist_ok=True)
    Path(args.log, f"rank{rank}.json").write_text(json.dumps(entry))


class _Recorder:
    """Wraps the module's forward to note which records this rank generated."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def wrap(self, module: object) -> None:
        forward = module.forward  # type: ignore[attr-defined]

        def recorded(records: list, skip: object = None) -> list:
            results = forward(records, skip)
            self.made.extend(item.record.file_stem for item in results)
            return results

        module.forward = recorded  # type: ignore[attr-defined]


def trainer(args: argparse.Namespace) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pcpp.lightning import DiffusionModule, GroupLayout, ImageWriter, PromptDataset, collate_records

    layout = GroupLayout(patch=args.patch, cfg=args.cfg)
    if args.tensor_parallel:  # a strategy that does not match the layout, built by hand
        tensor_parallel = args.tensor_parallel
        sizes = {"data_parallel_size": args.devices // tensor_parallel, "tensor_parallel_size": tensor_parallel}
    else:
        sizes = layout.strategy_kwargs(args.devices)
    module = DiffusionModule(layout)
    recorder = _Recorder()
    recorder.wrap(module)
    run = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(**sizes),
        callbacks=[ImageWriter(args.folder)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(PromptDataset(_records(args.records)), batch_size=args.batch_size, collate_fn=collate_records)
    run.predict(module, loader, return_predictions=False)
    _log(args, run.strategy.device_mesh, recorder.made)  # type: ignore[attr-defined]


def fabric(args: argparse.Namespace) -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    from pcpp.lightning import (
        DiffusionModule,
        GroupLayout,
        PromptDataset,
        PromptRecord,
        collate_records,
        parallelize_fn,
        predict_to_folder,
    )

    layout = GroupLayout(patch=args.patch, cfg=args.cfg)
    # The two int sizes, unpacked: typed Any so that mypy does not match int against every keyword parameter.
    sizes: dict[str, Any] = layout.strategy_kwargs(args.devices)
    strategy = ModelParallelStrategy(parallelize_fn, **sizes)
    run = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    run.launch()
    module = DiffusionModule(layout)
    recorder = _Recorder()
    recorder.wrap(module)
    wrapped = run.setup(module)
    loader = DataLoader(PromptDataset(_records(args.records)), batch_size=args.batch_size, collate_fn=collate_records)
    # One loader in, one (wrapped, not a DataLoader subclass) loader out, yielding collate_records' lists.
    batches = cast(Iterable[list[PromptRecord]], run.setup_dataloaders(loader, move_to_device=False))
    predict_to_folder(wrapped, batches, args.folder)
    _log(args, strategy.device_mesh, recorder.made)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("loop", choices=["trainer", "fabric"])
    parser.add_argument("--records", required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--patch", type=int, required=True)
    parser.add_argument("--cfg", type=int, default=1)
    parser.add_argument("--tensor-parallel", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    {"trainer": trainer, "fabric": fabric}[args.loop](args)


if __name__ == "__main__":
    main()
