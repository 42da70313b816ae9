"""pcpp.lightning: many prompts over data-parallel groups of patch-parallel ranks, under Trainer and Fabric.

The distributed tests launch tests/lightning_workers.py (Lightning starts the other ranks by running it again) on
gloo, and compare each image with the PNG that ``torchrun --nproc-per-node 2 -m pcpp generate`` writes for the
same prompt and seed: the same layout (a patch group of 2 ranks, pcpp's default settings), so the same arithmetic
on the same strips. Both are quantised to 8 bits the same way, so they must be equal pixel for pixel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from commands import ROOT, command_env, free_port, pixels

pytest.importorskip("lightning")

from pcpp.errors import ConversionError  # noqa: E402
from pcpp.lightning import GroupLayout, ImageFolder, OutputError, PromptRecord, quantize, read_metadata  # noqa: E402

WORKERS = ROOT / "tests" / "lightning_workers.py"
# 5 steps with pcpp's default 4 warmup steps: the last step is asynchronous, so the stale-activation path runs too.
SIZE, STEPS = 32, 5
RECORDS = [
    PromptRecord("a red circle on a blue background", seed=1, height=SIZE, width=SIZE, steps=STEPS),
    PromptRecord("a green square on a yellow background", seed=2, height=SIZE, width=SIZE, steps=STEPS),
    PromptRecord("a blue triangle on a white background", seed=3, height=SIZE, width=SIZE, steps=STEPS, guidance=3.0),
]


def _env() -> dict[str, str]:
    return command_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def launch(
    loop: str,
    tmp: Path,
    records: list[PromptRecord],
    devices: int,
    patch: int,
    folder: Path | None = None,
    **extra: Any,
) -> Path:
    """Run the worker script; returns the folder. Raises CalledProcessError with the output on failure."""
    spec = tmp / "records.json"
    spec.write_text(json.dumps([r.metadata() for r in records]))
    folder = folder if folder is not None else tmp / "images"
    args = [sys.executable, str(WORKERS), loop, "--records", str(spec), "--folder", str(folder)]
    args += ["--log", str(tmp / "log"), "--devices", str(devices), "--patch", str(patch)]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(args, env=_env(), check=True, capture_output=True, text=True, timeout=500)
    return folder


def logs(tmp: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (tmp / "log").glob("rank*.json")), key=lambda e: e["rank"])


@pytest.fixture(scope="module")
def cli_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """What ``pcpp generate`` on a 2-rank patch group makes for each record, as 8-bit pixels."""
    out = tmp_path_factory.mktemp("cli")
    images = {}
    for record in RECORDS:
        png = out / f"{record.file_stem}.png"
        args = ["--prompt", record.prompt, "--seed", str(record.seed), "--height", str(record.height)]
        args += ["--width", str(record.width), "--steps", str(record.steps), "--no-reference", "--out", str(png)]
        if record.guidance is not None:
            args += ["--guidance", str(record.guidance)]
        env = _env()
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        torchrun += ["--master-addr", "127.0.0.1", "--master-port", env["MASTER_PORT"], "-m", "pcpp", "generate"]
        subprocess.run([*torchrun, *args], env=env, check=True, capture_output=True, text=True, timeout=300)
        images[record.file_stem] = pixels(png)
    return images


# ---------------------------------------------------------------------------------------------- one process


def test_group_layout_that_does_not_divide_the_world_is_refused() -> None:
    with pytest.raises(ConversionError, match=r"patch 3 x cfg 1 = 3 ranks per image does not divide the world of 4"):
        GroupLayout(patch=3).strategy_kwargs(devices=4)
    with pytest.raises(ConversionError, match="does not divide the world of 6"):
        GroupLayout(patch=2, cfg=2).data_parallel_size(6)
    assert GroupLayout(patch=2, cfg=2).strategy_kwargs(devices=4, num_nodes=2) == {
        "data_parallel_size": 2,
        "tensor_parallel_size": 4,
    }
    with pytest.raises(ConversionError, match="cfg"):
        GroupLayout(patch=2, cfg=3)


def test_record_names_are_stable_and_validated() -> None:
    record = RECORDS[0]
    assert record.file_stem == PromptRecord(record.prompt, seed=1, height=SIZE, width=SIZE, steps=STEPS).file_stem
    assert record.file_stem != PromptRecord(record.prompt, seed=2, height=SIZE, width=SIZE, steps=STEPS).file_stem
    assert PromptRecord("x", name="cat-01").file_stem == "cat-01"
    with pytest.raises(ValueError, match="plain file name"):
        PromptRecord("x", name="../escape")
    with pytest.raises(ValueError, match="seed"):
        PromptRecord("x", seed=-1)


def test_image_folder_writes_png_with_the_record_and_refuses_an_unwritable_folder(tmp_path: Path) -> None:
    folder = ImageFolder(tmp_path / "out")
    folder.check_writable()
    image = torch.rand(3, 8, 12)
    path = folder.write(RECORDS[2], image)
    assert folder.is_written(RECORDS[2])
    assert not folder.is_written(RECORDS[0])
    assert (pixels(path) == quantize(image).numpy()).all()
    assert read_metadata(path) == RECORDS[2].metadata()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [path.name]  # no probe or temporary file left
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputError, match="cannot write images to"):
        ImageFolder(tmp_path / "a-file" / "out").check_writable()


# ---------------------------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_trainer_on_two_groups_of_two_writes_each_image_once_equal_to_pcpp_generate(
    tmp_path: Path, cli_images: dict[str, np.ndarray]
) -> None:
    """4 processes = 2 data-parallel groups x 2 patch ranks; 3 records, so the groups get 2 and 1."""
    folder = launch("trainer", tmp_path, RECORDS, devices=4, patch=2)
    entries = logs(tmp_path)
    assert [e["rank"] for e in entries] == [0, 1, 2, 3]
    by_group: dict[int, list[list[str]]] = {}
    for entry in entries:
        by_group.setdefault(entry["data_parallel_rank"], []).append(entry["made"])
    # Lightning's sampler shards over data_parallel only: both ranks of a group made the same records...
    assert all(made[0] == made[1] for made in by_group.values()), by_group
    # ...and the groups split the records between them, each made once.
    made = sorted(stem for group in by_group.values() for stem in group[0])
    assert made == sorted(r.file_stem for r in RECORDS)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r.file_stem}.png" for r in RECORDS)
    for record in RECORDS:
        png = folder / f"{record.file_stem}.png"
        assert read_metadata(png) == record.metadata()
        np.testing.assert_array_equal(pixels(png), cli_images[record.file_stem], err_msg=record.prompt)

    # Resume: the same folder again makes and writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    launch("trainer", tmp_path, RECORDS, devices=4, patch=2)
    assert all(entry["made"] == [] for entry in logs(tmp_path))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.slow
def test_fabric_on_one_group_of_two_equals_pcpp_generate(tmp_path: Path, cli_images: dict[str, np.ndarray]) -> None:
    records = RECORDS[:2]
    (tmp_path / "images").mkdir()
    # One image is already there: it is neither made again nor rewritten.
    done = tmp_path / "images" / f"{records[0].file_stem}.png"
    done.write_bytes(b"already here")
    folder = launch("fabric", tmp_path, records, devices=2, patch=2)
    assert [e["made"] for e in logs(tmp_path)] == [[records[1].file_stem]] * 2
    assert done.read_bytes() == b"already here"
    np.testing.assert_array_equal(pixels(folder / f"{records[1].file_stem}.png"), cli_images[records[1].file_stem])


def _fails(tmp_path: Path, folder: Path | None = None, **extra: int) -> str:
    with pytest.raises(subprocess.CalledProcessError) as failure:
        launch("trainer", tmp_path, RECORDS[:1], devices=2, folder=folder, **extra)
    return str(failure.value.stderr)


@pytest.mark.slow
def test_mesh_that_does_not_match_the_layout_is_refused_before_any_image(tmp_path: Path) -> None:
    # cfg 2 x patch 2 needs image groups of 4 ranks; the strategy was built with tensor_parallel_size=2.
    stderr = _fails(tmp_path, patch=2, cfg=2, tensor_parallel=2)
    assert "tensor_parallel dimension has 2 ranks but the group layout patch 2 x cfg 2 needs 4" in stderr
    assert not list((tmp_path / "images").glob("*.png"))


@pytest.mark.slow
def test_unwritable_output_folder_is_refused_before_any_image(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    stderr = _fails(tmp_path, patch=2, folder=tmp_path / "a-file" / "images")
    assert "OutputError" in stderr
    assert "cannot write images to" in stderr
    assert not (tmp_path / "log").exists()  # the worker logs only after predict returns
