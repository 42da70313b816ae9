"""`pcpp generate` refuses bad command lines at once: one line on stderr, once, exit status 2, before any model.

Each case runs the real command, ``python -m pcpp generate ...``, in a subprocess (no torchrun, one process), and
one case runs under ``torchrun --nproc-per-node 2``. "Before any model runs" is shown by the log: a run that gets
as far as the model logs ``loading model`` before loading it (``test_a_good_command_line_reaches_the_model``
checks that it does), and every refused command prints exactly one line, which is the error.
The subprocesses are started together (a few at a time) in one module fixture, because each spends seconds
importing torch and diffusers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from commands import command_env

# (case id, arguments after `generate`, a phrase the one line must contain). "{tmp}" is a fresh folder per run;
# "{file}" is an existing regular file in it.
USAGE_CASES: tuple[tuple[str, list[str], str], ...] = (
    ("partial-above-1", ["--partial", "2"], "--partial 2 is outside [0, 1]"),
    ("partial-negative", ["--partial", "-0.1"], "--partial -0.1 is outside [0, 1]"),
    ("partial-nan", ["--partial", "nan"], "is outside [0, 1]"),
    ("warmup-over-steps", ["--steps", "6", "--warmup-steps", "7"], "--warmup-steps 7 leaves none of the 6 steps"),
    ("warmup-equals-steps", ["--steps", "6", "--warmup-steps", "6"], "use --exact for that, or --warmup-steps 5"),
    ("warmup-negative", ["--warmup-steps", "-1"], "--warmup-steps -1 is negative"),
    ("steps-zero", ["--steps", "0"], "--steps 0 must be at least 1"),
    ("height-not-multiple", ["--height", "30"], "must be a multiple of 4 pixels; the nearest height that works is 32"),
    ("width-not-multiple", ["--width", "30"], "--width 30 is not a multiple of 4 pixels"),
    ("height-zero", ["--height", "0"], "must be positive"),
    ("cfg-split-one-process", ["--cfg-split"], "--cfg-split needs an even number of processes"),
    ("exact-and-full", ["--exact", "--full-conditioning"], "--exact makes every step synchronous"),
    ("exact-and-partial", ["--exact", "--partial", "0.5"], "so --partial would have no effect"),
    ("exact-and-warmup", ["--exact", "--warmup-steps", "2"], "so --warmup-steps would have no effect"),
    ("full-and-partial", ["--full-conditioning", "--partial", "0.5"], "--partial would have no effect"),
    ("timeout-zero", ["--timeout-s", "0"], "--timeout-s 0.0 must be a positive number"),
    ("out-is-folder", ["--out", "{tmp}"], "is a folder; give a file name"),
    ("out-under-a-file", ["--out", "{file}/x.png"], "is a file, not a folder"),
    ("report-under-a-file", ["--report", "{file}/r.json"], "--report"),
    ("report-is-out", ["--out", "{tmp}/a.png", "--report", "{tmp}/a.png"], "same file as --out"),
    ("unknown-word", ["--prompt", "a red dog on a blue background"], "unknown word(s) ['dog']"),
    ("unknown-option", ["--partail", "0.3"], "unrecognized arguments: --partail"),
    ("not-an-int", ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("missing-model", ["--model", "{tmp}/no-such-pipeline"], "no such folder"),
)
GOOD = ["--height", "8", "--width", "8", "--steps", "1", "--no-reference"]


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    folder: Path


def _env() -> dict[str, str]:
    return command_env(PYTHONWARNINGS="ignore")


def _run(folder: Path, command: list[str]) -> Outcome:
    folder.mkdir(parents=True)
    (folder / "file").write_text("not a folder")
    args = [a.replace("{tmp}", str(folder)).replace("{file}", str(folder / "file")) for a in command]
    done = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=folder, timeout=600)
    return Outcome(done.returncode, done.stdout, done.stderr, folder)


# The cases also run as real commands (``python -m pcpp generate``): one of pcpp's own checks, and the three that
# come from argparse or the file system. The others run in this process through the same entry point,
# ``generate_main``: each subprocess costs seconds of torch and diffusers imports, which would double this file's time.
SUBPROCESS_CASES = ("partial-above-1", "unknown-option", "not-an-int", "missing-model")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("cli")
    generate = [sys.executable, "-m", "pcpp", "generate"]
    commands = {name: [*generate, *args] for name, args, _ in USAGE_CASES if name in SUBPROCESS_CASES}
    commands["good"] = [*generate, *GOOD, "--out", "{tmp}/good.png"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, root / name, cmd) for name, cmd in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def test_a_good_command_line_reaches_the_model(outcomes: dict[str, Outcome]) -> None:
    """The counterpart of the cases below: a valid command logs `loading model` and writes its image."""
    good = outcomes["good"]
    assert good.returncode == 0, good.stderr
    assert "loading model tiny" in good.stderr
    assert (good.folder / "good.png").is_file()


def _run_in_process(folder: Path, args: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    """``generate_main(args)`` in this process, as one process without torchrun, in a fresh ``folder``."""
    from pcpp.cli.generate import generate_main

    folder.mkdir(parents=True)
    (folder / "file").write_text("not a folder")
    args = [a.replace("{tmp}", str(folder)).replace("{file}", str(folder / "file")) for a in args]
    capsys.readouterr()
    status = generate_main(args)
    captured = capsys.readouterr()
    return Outcome(status, captured.out, captured.err, folder)


@pytest.mark.parametrize(("name", "args", "phrase"), USAGE_CASES, ids=[name for name, _, _ in USAGE_CASES])
def test_usage_error_is_one_line_once_with_status_2_before_any_model(
    outcomes: dict[str, Outcome],
    name: str,
    args: list[str],
    phrase: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if name in SUBPROCESS_CASES:
        outcome = outcomes[name]
    else:
        for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.chdir(tmp_path)
        # A run that got past the checks configures logging onto this (captured) stderr and logs "loading model"
        # there, as the real command does, so the one-line check below holds in this process too.
        outcome = _run_in_process(tmp_path / name, args, capsys)
    lines = outcome.stderr.splitlines()
    assert outcome.returncode == 2, outcome.stderr
    assert len(lines) == 1, outcome.stderr  # so no `loading model` line, no traceback, no usage block
    assert lines[0].startswith("pcpp generate: error: "), lines
    assert phrase.replace("{tmp}", str(outcome.folder)) in lines[0]
    assert outcome.stdout == ""
    assert sorted(p.name for p in outcome.folder.iterdir()) == ["file"]  # nothing written


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_usage_error_under_torchrun_is_printed_once_by_rank_0(tmp_path: Path) -> None:
    """Under torchrun every rank refuses (exit 2) before any process group exists; only rank 0 prints the line.

    torchrun then stops the other workers, prints its own failure report, because a worker exited non-zero, and
    exits with status 1; that report cannot be suppressed from the workers, but it shows pcpp's line as the failed
    ranks' "traceback" (pcpp writes torchrun's error file) instead of "<N/A>".
    """
    command = ["torchrun", "--nproc-per-node", "2", "-m", "pcpp", "generate", "--partial", "2"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    output = done.stdout + done.stderr
    ours = [line for line in output.splitlines() if line.startswith("pcpp generate: error:")]
    assert ours == [
        "pcpp generate: error: --partial 2 is outside [0, 1]: it is the share of neighbour rows attention reads"
    ], output
    assert done.returncode == 1, output  # torchrun's own status for any failed worker
    # torchrun's root cause is a rank that exited with 2, and its report quotes pcpp's line (from the error file).
    # Rank 0 exits first (the other ranks wait for it to print), so torchrun names it; the others get its SIGTERM.
    root_cause = output.split("Root Cause")[-1]
    assert "exitcode  : 2" in root_cause, output
    assert "traceback : pcpp generate: error: --partial 2 is outside [0, 1]" in root_cause, output
    assert output.count("Traceback (most recent call last)") == 1, output  # torchrun's own; none from the ranks


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    outcome = _run(tmp_path / "debug", [sys.executable, "-m", "pcpp", "generate", "--partial", "2", "--debug"])
    assert outcome.returncode == 2
    assert outcome.stderr.startswith("Traceback (most recent call last)"), outcome.stderr
    assert outcome.stderr.splitlines()[-1].startswith("pcpp generate: error: --partial 2 is outside [0, 1]")


def test_a_fault_is_one_line_per_failing_rank_with_status_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Faults (a peer timing out, say) may differ between ranks, so each failing rank prints its own line; usage
    errors are the same everywhere, so only rank 0 prints them. Both fill torchrun's error file when it is set."""
    from pcpp.cli.failures import report_failure
    from pcpp.cli.options import UsageError
    from pcpp.errors import PeerTimeoutError

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    fault = PeerTimeoutError("rank 0 did not answer within 10 s\n(layer down_blocks.0, step 3)")
    assert report_failure(fault, rank=1, debug=False) == 1
    line = "pcpp generate: rank 1: PeerTimeoutError: rank 0 did not answer within 10 s (layer down_blocks.0, step 3)"
    assert capsys.readouterr().err == line + " (rerun with --debug for the traceback)\n"
    assert json.loads(error_file.read_text())["message"]["message"].startswith(line)

    assert report_failure(UsageError("--steps 0 must be at least 1"), rank=1, debug=False, usage_wait_s=0) == 2
    assert capsys.readouterr().err == ""
    assert report_failure(UsageError("--steps 0 must be at least 1"), rank=0, debug=False) == 2
    assert capsys.readouterr().err == "pcpp generate: error: --steps 0 must be at least 1\n"

    with pytest.raises(PeerTimeoutError) as raised:
        raise fault
    assert report_failure(raised.value, rank=0, debug=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)")
    assert err.endswith("PeerTimeoutError: rank 0 did not answer within 10 s (layer down_blocks.0, step 3)\n")


def test_pipeline_sizes_come_from_its_unet_and_vae_configs(tmp_path: Path) -> None:
    """A pipeline folder is checked from its config files alone: SD 1.5's UNet downsamples 8x below an 8x VAE, so
    heights go in multiples of 64 pixels (at least 64 per strip) and widths in multiples of 8."""
    from pcpp.cli.options import UsageError, parse_options

    for part, config in {
        "unet": {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]},
        "vae": {"block_out_channels": [128, 256, 512, 512]},
    }.items():
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(config))
    out = ["--out", str(tmp_path / "x.png")]
    ok = parse_options(["--model", str(tmp_path), "--height", "128", "--width", "200", *out], rank=0, world=2)
    assert (ok.height, ok.width, ok.world) == (128, 200, 2)
    message = (
        "its VAE downsamples 8x and its UNet downsamples 8x more, so the height must be a multiple of 64 pixels and "
        "at least 192 for 3 strips; the nearest height that works is 192"
    )
    with pytest.raises(UsageError, match=message):
        parse_options(["--model", str(tmp_path), "--height", "128", *out], rank=0, world=3)
    with pytest.raises(UsageError, match="--width 100 is not a multiple of 8 pixels"):
        parse_options(["--model", str(tmp_path), "--height", "64", "--width", "100", *out], rank=0, world=1)
