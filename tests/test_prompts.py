"""``pcpp generate --prompts``: many images over data-parallel groups of patch-parallel processes.

One-process tests call :func:`pcpp.cli.generate_main` in this process (no torchrun: world 1, or a world size read
from the environment for checks made before any process group exists). The distributed tests run ``torchrun`` on
CPU with gloo and the shipped tiny model at 32x32, and compare with the PNG that ``torchrun --nproc-per-node 2 -m
pcpp generate`` writes for the same prompt and seed: the same layout (a patch group of 2 ranks, pcpp's default
settings), so the same arithmetic on the same strips, quantised by the same PNG writer, so equal pixel for pixel.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from commands import command_env, free_port, pixels
from pcpp.batch import ImageFolder, PromptRecord, RecordDefaults, read_metadata, read_prompt_file
from pcpp.cli import generate_main
from pcpp.models.imageio import read_png_text, save_png

# 5 steps with pcpp's default 4 warmup steps: the last step is asynchronous, so the stale-activation path runs too.
SIZE, STEPS = 32, 5
SMALL = ["--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS)]


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    run += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "pcpp", "generate"]
    return run + args


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _pngs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".png"}


# ---------------------------------------------------------------------------------------------- one process


def test_prompt_file_lines_seeds_and_defaults(tmp_path: Path) -> None:
    lines = [
        "# a comment, then a blank line",
        "",
        "a red circle on a blue background",
        '{"prompt": "a green square", "seed": 42, "height": 64, "guidance": 3.5, "name": "square"}',
        '{"prompt": "a ring", "colour": "red"}',
        "  a white cross  ",
        '{"prompt": "a ring", "steps": 2.5}',
        '{"seed": 1}',
        "a red circle on a blue background",
    ]
    file = read_prompt_file(_write(tmp_path / "p.txt", lines), RecordDefaults(seed=10, height=32, width=48, steps=3))
    assert file.lines == (3, 4, 6, 9)
    first, square, cross, again = file.records
    # seed = --seed + index among prompt lines (comments and blanks not counted, malformed ones counted)
    assert first == PromptRecord("a red circle on a blue background", seed=10, height=32, width=48, steps=3)
    assert square == PromptRecord("a green square", seed=42, height=64, width=48, steps=3, guidance=3.5, name="square")
    assert (cross.prompt, cross.seed) == ("a white cross", 13)
    # line 9 repeats line 3's prompt with another seed (index 6): another image, kept under another name
    assert (again.prompt, again.seed) == (first.prompt, 16)
    assert again.file_stem != first.file_stem
    skipped = {s.line: s.reason for s in file.skipped}
    assert sorted(skipped) == [5, 7, 8]
    assert "unknown field(s) 'colour'" in skipped[5]
    assert "steps=2.5 must be an int" in skipped[7]
    assert '"prompt"' in skipped[8]


def test_duplicate_request_is_skipped_and_empty_file_refused(tmp_path: Path) -> None:
    same = '{"prompt": "a red circle", "seed": 1}'
    file = read_prompt_file(_write(tmp_path / "p.txt", [same, same]), RecordDefaults())
    assert len(file.records) == 1
    assert [(s.line, s.reason) for s in file.skipped] == [
        (2, f"same image file as line 1 ({file.records[0].file_stem}.png)")
    ]
    with pytest.raises(ValueError, match="no prompt lines"):
        read_prompt_file(_write(tmp_path / "empty.txt", ["# nothing", ""]), RecordDefaults())


def test_image_folder_writes_the_same_pixels_as_pcpp_generate(tmp_path: Path) -> None:
    """One PNG writer: ImageFolder and ``pcpp generate`` (save_png) quantise an image to the same bytes of pixels."""
    image = torch.rand(3, 8, 12) * 1.2 - 0.1  # values outside [0, 1] too: both clamp
    save_png(image, tmp_path / "generate.png", {"prompt": "x"})
    folder = ImageFolder(tmp_path / "folder", extra_metadata={"model": "tiny", "prompt": "not the record's"})
    folder.check_writable()
    record = PromptRecord("a red circle", seed=3, height=8, width=12, steps=2)
    path = folder.write(record, image)
    np.testing.assert_array_equal(pixels(path), pixels(tmp_path / "generate.png"))
    text = read_png_text(path)
    assert text["prompt"] == "a red circle"  # the record's own fields win over extra metadata
    assert text["model"] == "tiny"
    assert read_metadata(path) == record.metadata()


def test_half_written_files_of_a_killed_run_are_removed_before_any_image(tmp_path: Path) -> None:
    folder = ImageFolder(tmp_path)
    (tmp_path / ".a-red-circle-0123.png.5f3a.tmp").write_bytes(b"\x89PNG half")
    (tmp_path / "keep.txt").write_text("not ours")
    folder.check_writable()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.slow  # a whole image or study: out of the quick loop
def test_one_process_makes_the_good_lines_and_names_the_malformed_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = _write(
        tmp_path / "p.txt",
        ["a red circle on a blue background", '{"prompt": "a green square", "seed": }', "a blue triangle"],
    )
    out, report = tmp_path / "out", tmp_path / "report.json"
    status = generate_main(["--prompts", str(prompts), "--out-dir", str(out), "--report", str(report), *SMALL])
    assert status == 0
    stderr = capsys.readouterr().err
    assert f"{prompts} line 2: not valid JSON" in stderr
    assert len(_pngs(out)) == 2
    summary = _strict_json(report.read_text())
    assert summary["made"] == 2
    assert summary["skipped"] == 0
    assert [f["line"] for f in summary["failed_lines"]] == [2]
    assert summary["images_per_minute"] > 0
    # The seeds: --seed (0) + index of the prompt line; line 3 is index 2 (the malformed line 2 counts).
    seeds = sorted(int(read_png_text(out / name)["seed"]) for name in _pngs(out))
    assert seeds == [0, 2]
    assert read_png_text(out / next(iter(_pngs(out))))["group_size"] == "1"

    # Again: every image is already there, none is made.
    assert generate_main(["--prompts", str(prompts), "--out-dir", str(out), "--report", str(report), *SMALL]) == 0
    assert (_strict_json(report.read_text())["made"], _strict_json(report.read_text())["skipped"]) == (0, 2)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model is loaded: refusals must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("pcpp.models.load_tiny", refuse)


@pytest.mark.usefixtures("no_model")
def test_group_size_that_does_not_divide_the_world_is_refused_before_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What each rank of `torchrun --nproc-per-node 4` sees; the check is made before a process group exists.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    prompts = _write(tmp_path / "p.txt", ["a red circle"])
    base = ["--prompts", str(prompts), "--out-dir", str(tmp_path / "out"), *SMALL]
    err = _refused([*base, "--group-size", "3"], capsys)
    assert err.startswith("pcpp generate: error: --group-size 3 does not divide the 4 process(es)")
    assert "1, 2, 4" in err
    assert "even --group-size" in _refused([*base, "--group-size", "1", "--cfg-split"], capsys)
    assert "applies to --prompts" in _refused(["--group-size", "2", *SMALL], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("no_model")
def test_unwritable_output_folder_is_refused_before_any_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = _write(tmp_path / "p.txt", ["a red circle"])
    (tmp_path / "a-file").write_text("")
    err = _refused(["--prompts", str(prompts), "--out-dir", str(tmp_path / "a-file" / "out"), *SMALL], capsys)
    assert "--out-dir" in err
    assert "is a file, not a folder" in err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in _refused(["--prompts", str(prompts), "--out-dir", str(locked), *SMALL], capsys)


@pytest.mark.usefixtures("no_model")
def test_one_image_options_do_not_mix_with_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = _write(tmp_path / "p.txt", ["a red circle"])
    assert "--prompt make one image" in _refused(["--prompts", str(prompts), "--prompt", "a ring"], capsys)
    assert "--out make one image" in _refused(["--prompts", str(prompts), "--out", str(tmp_path / "x.png")], capsys)
    assert "--out-dir is the folder of --prompts" in _refused(["--out-dir", str(tmp_path)], capsys)
    assert "no prompt lines" in _refused(["--prompts", str(_write(tmp_path / "e.txt", ["# none"]))], capsys)
    bad = _write(tmp_path / "bad.txt", ["a blue zebra"])
    assert "none of its 1 prompt line(s) can be made; line 1: unknown word" in _refused(["--prompts", str(bad)], capsys)


# ---------------------------------------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_two_groups_of_two_make_each_image_once_equal_to_pcpp_generate(tmp_path: Path) -> None:
    """4 processes as 2 groups of 2; 3 prompts, so the groups make 2 and 1 (round-robin)."""
    prompts = _write(
        tmp_path / "p.txt",
        [
            "a red circle on a blue background",
            '{"prompt": "a green square on a yellow background", "seed": 42}',
            '{"prompt": "a blue triangle on a white background", "guidance": 3.0, "name": "triangle"}',
        ],
    )
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = [
        "--prompts",
        str(prompts),
        "--out-dir",
        str(out),
        "--group-size",
        "2",
        "--seed",
        "5",
        "--report",
        str(report),
    ]
    subprocess.run(
        _torchrun(4, [*args, *SMALL]), env=command_env(), check=True, capture_output=True, text=True, timeout=300
    )
    summary = _strict_json(report.read_text())
    assert (summary["groups"], summary["made"], summary["skipped"], summary["failed_lines"]) == (2, 3, 0, [])
    files = sorted(out.iterdir())
    assert len(files) == 3  # one PNG per prompt, nothing else (no temporary or probe file)
    by_prompt = {read_png_text(f)["prompt"]: f for f in files}
    # (prompt, seed, guidance) of each line: plain lines get --seed + index, a line's own seed wins.
    expected: list[tuple[str, int, float | None]] = [
        ("a red circle on a blue background", 5, None),
        ("a green square on a yellow background", 42, None),
    ]
    expected.append(("a blue triangle on a white background", 7, 3.0))
    assert by_prompt["a blue triangle on a white background"].name == "triangle.png"
    for prompt, seed, guidance in expected:
        png = by_prompt[prompt]
        text = read_png_text(png)
        assert (int(text["seed"]), text["group_size"], text["model"]) == (seed, "2", "tiny")
        single = tmp_path / f"single-{seed}.png"
        one = ["--prompt", prompt, "--seed", str(seed), "--no-reference", "--out", str(single), *SMALL]
        one += ["--guidance", str(guidance)] if guidance is not None else []
        subprocess.run(_torchrun(2, one), env=command_env(), check=True, capture_output=True, text=True, timeout=300)
        np.testing.assert_array_equal(pixels(png), pixels(single), err_msg=prompt)


def _descendants(pid: int) -> list[int]:
    """``pid``'s processes and their children, from /proc (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


@pytest.mark.slow
def test_resume_after_a_kill_redoes_and_loses_nothing(tmp_path: Path) -> None:
    prompts = _write(
        tmp_path / "p.txt",
        [
            f"a {c} {s} on a {b} background"
            for c, s, b in [
                ("red", "circle", "blue"),
                ("green", "square", "white"),
                ("blue", "ring", "yellow"),
                ("pink", "cross", "black"),
                ("cyan", "diamond", "red"),
                ("white", "triangle", "purple"),
                ("orange", "circle", "green"),
                ("black", "square", "pink"),
            ]
        ],
    )
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = ["--prompts", str(prompts), "--out-dir", str(out), "--group-size", "2", "--height", "32", "--width", "32"]
    args += ["--steps", "12"]
    run = subprocess.Popen(
        _torchrun(4, args),
        env=command_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and _pngs(out)):
            assert run.poll() is None, "the run ended before its first image"
            assert time.monotonic() < deadline, "no image after 240 s"
            time.sleep(0.02)
    finally:
        for pid in _descendants(run.pid):  # the agent and its workers, as a crash or a preemption would
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.wait(timeout=30)
    time.sleep(0.5)
    before = _pngs(out)
    assert 0 < len(before) < 8, f"killed with {len(before)} of 8 images: not midway"

    subprocess.run(
        _torchrun(4, [*args, "--report", str(report)]), env=command_env(), check=True, capture_output=True, timeout=300
    )
    after = _pngs(out)
    assert len(after) == 8  # nothing lost
    assert {name: after[name] for name in before} == before  # nothing redone: the earlier files are untouched
    summary = _strict_json(report.read_text())
    assert (summary["skipped"], summary["made"]) == (len(before), 8 - len(before))
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == []  # no half-written file left
    for name in after:  # every PNG is whole
        assert pixels(out / name).shape == (32, 32, 3)


def test_the_command_line_and_pcpp_batch_need_no_lightning() -> None:
    code = (
        "import sys, pcpp.batch, pcpp.cli, pcpp.cli.prompts; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], env=command_env(), check=True, timeout=120)
    lightning = pytest.importorskip("lightning")
    assert lightning is not None
    import pcpp.batch
    import pcpp.lightning

    # pcpp.lightning re-exports the Lightning-independent pieces: one class each, not a copy.
    for name in ("PromptRecord", "ImageFolder", "GroupLayout", "tiny_backend", "check_writable_everywhere"):
        assert getattr(pcpp.lightning, name) is getattr(pcpp.batch, name)
