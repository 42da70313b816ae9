"""``pcpp generate``'s arguments: the parser and every check that can be made before a model is loaded."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pcpp import Conditioning, VAEPlacement
from pcpp.batch import GroupLayout, PromptFile, PromptRecord, RecordDefaults, read_prompt_file

from .errors import UsageError
from .paths import check_writable_file, check_writable_folder
from .sizes import SizeRule, size_rule

__all__ = ["GenerateOptions", "UsageError", "build_parser", "parse_options"]

DEFAULT_PARTIAL = 0.3
DEFAULT_WARMUP = 4
DEFAULT_PROMPT = "a red circle on a blue background"
DEFAULT_OUT = "pcpp.png"
DEFAULT_OUT_DIR = "pcpp-images"


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting, and is silent off rank 0."""

    def __init__(self, *args: object, quiet: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._quiet = quiet

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def _print_message(self, message: str, file: Any = None) -> None:
        if not self._quiet:  # --help under torchrun: once, not once per rank
            super()._print_message(message, file)


def build_parser(quiet: bool = False) -> argparse.ArgumentParser:
    """The argument parser of ``pcpp generate``.

    Args:
        quiet: Print nothing (``--help``) — for ranks other than the first.

    Returns:
        The parser; its ``error`` raises :class:`UsageError`.
    """
    parser = _Parser(
        prog="pcpp generate",
        quiet=quiet,
        description="Generate one image with patch parallelism over every process of a torchrun job (one process "
        "without torchrun), save it as PNG (prompt, seed and settings in its text chunks), then compare it with the "
        "single-device image. With --prompts FILE: many images, one per line of FILE, made by data-parallel groups "
        "of --group-size processes each (one image at a time per group), into --out-dir. Default model: pcpp's own "
        "tiny text-to-image model (coloured shapes), shipped with the package: no download. Usage errors print one "
        "line and exit with status 2.",
    )
    add = parser.add_argument
    add("--prompt", default=None, help=f"what to draw (default: {DEFAULT_PROMPT!r}; not with --prompts)")
    add("--model", default="tiny", help="'tiny' or a diffusers pipeline id or folder (default: %(default)s)")
    add("--height", type=int, default=128, help="image height in pixels (default: %(default)s)")
    add("--width", type=int, default=128, help="image width in pixels (default: %(default)s)")
    add("--steps", type=int, default=20, help="denoising steps, at least 1 (default: %(default)s)")
    add("--guidance", type=float, default=None, help="CFG scale (default: the model's; 2.0 for tiny)")
    add(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial noise, same on every rank; with --prompts, the seed of the first prompt line, the "
        "next lines getting --seed + 1, + 2, ... unless a line gives its own (default: %(default)s)",
    )
    add(
        "--partial",
        type=float,
        default=None,
        help=f"share of neighbour rows attention reads, in [0, 1] (default: {DEFAULT_PARTIAL})",
    )
    add(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"synchronous steps at the start, fewer than --steps (default: {DEFAULT_WARMUP}; if that is not "
        "fewer than --steps, every step is synchronous and the run says so)",
    )
    add("--full-conditioning", action="store_true", help="DistriFusion's every-strip attention (not with --partial)")
    add("--exact", action="store_true", help="every step synchronous, reproduces one device (no --partial/--warmup)")
    add("--cfg-split", action="store_true", help="split the CFG batch over 2 groups (an even number of processes)")
    add("--no-reference", action="store_true", help="skip the single-device comparison")
    add(
        "--vae",
        choices=[p.value for p in VAEPlacement],
        default=None,
        help="where a pipeline's VAE decodes: 'parallel', each process its strip (exact; about 1/N of the "
        "activations each), or 'whole', every process the whole image, as on one device. Not for --model tiny "
        f"(no VAE) (default: {VAEPlacement.PARALLEL.value})",
    )
    add("--out", default=None, help=f"where rank 0 saves the image, PNG (default: {DEFAULT_OUT}; not with --prompts)")
    add(
        "--prompts",
        default=None,
        metavar="FILE",
        help='make one image per line of FILE: a prompt, or a JSON object with "prompt" and optionally "seed", '
        '"height", "width", "steps", "guidance", "name" (blank lines and # comments skipped; the '
        "options above fill what a line leaves out; a malformed line is named and skipped). No single-device "
        "comparison. (default: none: one image, --prompt)",
    )
    add(
        "--out-dir",
        default=None,
        metavar="DIR",
        help=f"with --prompts: the folder of the images, one PNG per line; images already there are skipped, so a "
        f"rerun resumes (default: {DEFAULT_OUT_DIR})",
    )
    add(
        "--group-size",
        type=int,
        default=None,
        metavar="N",
        help="with --prompts: processes per image; the world is cut into world/N groups that share out the prompts "
        "(round-robin). With --cfg-split, each group is cfg 2 x patch N/2 (default: all processes, one group)",
    )
    add(
        "--report",
        default=None,
        help="rank 0 also writes timings and comparison (with --prompts: the summary) here as strict JSON",
    )
    add("--timeout-s", type=float, default=300.0, help="longest wait on a peer, seconds (default: %(default)s)")
    add("--debug", action="store_true", help="print the traceback of an error, not just its one line")
    return parser


@dataclass(frozen=True)
class GenerateOptions:
    """Validated settings of one ``pcpp generate`` run (see :func:`build_parser` for their meaning).

    Attributes:
        world: Processes in the job.
        rank: This process's rank.
        prompts: With ``--prompts``: the records read from the file and the lines skipped; None for one image.
        out_dir: With ``--prompts``: the image folder; None for one image.
        group_size: Processes per image: the world for one image, ``--group-size`` with ``--prompts``.
        vae: Where a pipeline's VAE decodes (:class:`pcpp.VAEPlacement`); unused by the tiny model.
    """

    prompt: str
    model: str
    height: int
    width: int
    steps: int
    guidance: float | None
    seed: int
    partial: float
    warmup_steps: int
    conditioning: Conditioning
    exact: bool
    cfg_split: bool
    reference: bool
    out: Path
    report: Path | None
    timeout_s: float
    debug: bool
    world: int
    rank: int
    prompts: PromptFile | None = None
    out_dir: Path | None = None
    group_size: int = 1
    vae: VAEPlacement = VAEPlacement.PARALLEL

    @property
    def layout(self) -> GroupLayout:
        """The processes that make one image together: cfg 2 x patch ``group_size / 2`` with ``--cfg-split``."""
        cfg = 2 if self.cfg_split else 1
        return GroupLayout(patch=self.group_size // cfg, cfg=cfg)

    @property
    def synchronous_steps(self) -> int:
        """Steps that run synchronously: every one in exact mode, else the warmup (the first step always)."""
        return self.steps if self.exact else min(self.steps, max(1, self.warmup_steps))

    @property
    def mode(self) -> str:
        """The run's mode in words, as logged and reported."""
        if self.exact:
            return "exact"
        if self.synchronous_steps == self.steps:
            return f"exact (warmup {self.warmup_steps} covers all {self.steps} steps)"
        return "full conditioning" if self.conditioning is Conditioning.FULL else f"partial {self.partial}"


def _check_modes(ns: argparse.Namespace) -> None:
    if ns.exact:
        given = [f for f, v in (("--partial", ns.partial), ("--warmup-steps", ns.warmup_steps)) if v is not None]
        given += ["--full-conditioning"] if ns.full_conditioning else []
        if given:
            raise UsageError(
                f"--exact makes every step synchronous, so {' and '.join(given)} would have no effect; drop one"
            )
    if ns.full_conditioning and ns.partial is not None:
        raise UsageError("--full-conditioning reads every other strip whole, so --partial would have no effect")
    if ns.partial is not None and not (math.isfinite(ns.partial) and 0.0 <= ns.partial <= 1.0):
        raise UsageError(
            f"--partial {ns.partial:g} is outside [0, 1]: it is the share of neighbour rows attention reads"
        )
    if ns.warmup_steps is not None:
        if ns.warmup_steps < 0:
            raise UsageError(f"--warmup-steps {ns.warmup_steps} is negative")
        if ns.warmup_steps >= ns.steps:
            raise UsageError(
                f"--warmup-steps {ns.warmup_steps} leaves none of the {ns.steps} steps asynchronous (every step "
                f"would be synchronous); use --exact for that, or --warmup-steps {max(0, ns.steps - 1)} or fewer"
            )


def _check_group(ns: argparse.Namespace, world: int) -> int:
    """Checks ``--group-size`` and ``--cfg-split`` against the world; returns the processes per image."""
    if ns.group_size is not None and ns.prompts is None and ns.group_size != world:
        raise UsageError(
            f"--group-size {ns.group_size} applies to --prompts; one image is made by all {world} process(es)"
        )
    group = world if ns.group_size is None else ns.group_size
    if group < 1 or world % group:
        divisors = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise UsageError(
            f"--group-size {group} does not divide the {world} process(es) of this run into whole groups; use one "
            f"of {divisors}"
        )
    if ns.cfg_split and group % 2:
        if ns.group_size is None:
            raise UsageError(
                f"--cfg-split needs an even number of processes (2 groups of strips); this run has {world}"
                + (" (run it under torchrun --nproc-per-node 2 or more)" if world == 1 else "")
            )
        raise UsageError(f"--cfg-split needs an even --group-size (cfg 2 x patch N/2); got {group}")
    return group


def _check_numbers(ns: argparse.Namespace) -> None:
    """Checks the counts and sizes."""
    if ns.steps < 1:
        raise UsageError(f"--steps {ns.steps} must be at least 1")
    if ns.height < 1 or ns.width < 1:
        raise UsageError(f"--height {ns.height} and --width {ns.width} must be positive")
    if not (math.isfinite(ns.timeout_s) and ns.timeout_s > 0):
        raise UsageError(f"--timeout-s {ns.timeout_s} must be a positive number of seconds")
    if ns.guidance is not None and not math.isfinite(ns.guidance):
        raise UsageError(f"--guidance {ns.guidance} must be a finite number")
    if not 0 <= ns.seed < 2**63:
        raise UsageError(f"--seed {ns.seed} must be in [0, 2**63)")


def _check_vae(ns: argparse.Namespace) -> None:
    """``--vae`` places a pipeline's VAE (one image or ``--prompts``): refused where it would have no effect."""
    if ns.vae is None:
        return
    if ns.model == "tiny":
        raise UsageError(f"--vae {ns.vae}: the tiny model draws pixels directly and has no VAE; drop --vae")


def _check_model(model: str) -> None:
    if model == "tiny" or Path(model).is_dir():
        return
    if model.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise UsageError(f"--model {model}: no such folder, and not a hub id either (use 'tiny', a folder or org/name)")


def _prompt_problem(model: str, prompt: str) -> str | None:
    """Why the model cannot draw ``prompt`` (the tiny model knows few words; a pipeline takes any text), or None."""
    if model != "tiny":
        return None
    from pcpp.models import load_tokenizer

    try:
        load_tokenizer().words(prompt)
    except ValueError as exc:
        return str(exc)
    return None


def _check_prompt(model: str, prompt: str) -> None:
    problem = _prompt_problem(model, prompt)
    if problem:
        raise UsageError(f"--prompt: {problem}")


def _read_prompts(ns: argparse.Namespace, rule: SizeRule | None, strips: int) -> PromptFile:
    """Reads ``--prompts``; a line the model cannot make (size, words) is skipped like a malformed one."""
    defaults = RecordDefaults(seed=ns.seed, height=ns.height, width=ns.width, steps=ns.steps, guidance=ns.guidance)

    def check(record: PromptRecord) -> str | None:
        size = rule.problem(record.height, record.width, strips) if rule is not None else None
        if size:  # the rule names the options; here the values may come from the line
            return size.replace("--height ", "height ").replace("--width ", "width ")
        return _prompt_problem(ns.model, record.prompt)

    try:
        prompts = read_prompt_file(ns.prompts, defaults, check)
    except ValueError as exc:
        raise UsageError(f"--prompts: {exc}") from None
    if not prompts.records:
        first = prompts.skipped[0]
        raise UsageError(
            f"--prompts {ns.prompts}: none of its {len(prompts.skipped)} prompt line(s) can be made; line "
            f"{first.line}: {first.reason}"
        )
    return prompts


def _check_outputs(ns: argparse.Namespace) -> tuple[Path | None, Path | None, Path | None]:
    """Checks where the run writes; returns (--out, --out-dir, --report), the first None with --prompts."""
    report = Path(ns.report) if ns.report else None
    if ns.prompts is not None:
        given = [f for f, v in (("--prompt", ns.prompt), ("--out", ns.out)) if v is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} make one image; --prompts makes one per line into --out-dir")
        out_dir = Path(DEFAULT_OUT_DIR if ns.out_dir is None else ns.out_dir)
        check_writable_folder("--out-dir", out_dir)
        if report is not None:
            check_writable_file("--report", report)
        return None, out_dir, report
    if ns.out_dir is not None:
        raise UsageError("--out-dir is the folder of --prompts; for one image, use --out FILE")
    out = Path(DEFAULT_OUT if ns.out is None else ns.out)
    check_writable_file("--out", out)
    if report is not None:
        if report.resolve() == out.resolve():
            raise UsageError(f"--report {report} is the same file as --out")
        check_writable_file("--report", report)
    return out, None, report


def parse_options(argv: list[str] | None, *, rank: int, world: int) -> GenerateOptions:
    """Parses and validates ``pcpp generate``'s arguments, before any process group or model exists.

    Args:
        argv: The arguments after ``generate`` (``sys.argv[2:]`` if None).
        rank: This process's rank (from torchrun's environment).
        world: Processes in the job.

    Returns:
        The options.

    Raises:
        UsageError: An argument is malformed, out of range, contradicts another, names an unwritable output,
            (tiny model) the prompt has a word the model does not know, ``--group-size`` does not divide the world,
            or the ``--prompts`` file cannot be read or has no line that can be made (a malformed line alone is
            skipped and listed in ``prompts.skipped``), or ``--vae`` is given where it has no effect (the tiny
            model); the message is one line.
    """
    ns = build_parser(quiet=rank != 0).parse_args(argv)
    _check_modes(ns)
    _check_numbers(ns)
    group = _check_group(ns, world)
    strips = group // 2 if ns.cfg_split else group
    _check_model(ns.model)
    _check_vae(ns)
    rule = size_rule(ns.model)
    if ns.prompts is None:
        problem = rule.problem(ns.height, ns.width, strips) if rule is not None else None
        if problem:
            raise UsageError(problem)
        _check_prompt(ns.model, DEFAULT_PROMPT if ns.prompt is None else ns.prompt)
    out, out_dir, report = _check_outputs(ns)
    prompts = _read_prompts(ns, rule, strips) if ns.prompts is not None else None
    return GenerateOptions(
        prompt=DEFAULT_PROMPT if ns.prompt is None else ns.prompt,
        model=ns.model,
        height=ns.height,
        width=ns.width,
        steps=ns.steps,
        guidance=ns.guidance,
        seed=ns.seed,
        partial=DEFAULT_PARTIAL if ns.partial is None else ns.partial,
        warmup_steps=DEFAULT_WARMUP if ns.warmup_steps is None else ns.warmup_steps,
        conditioning=Conditioning.FULL if ns.full_conditioning else Conditioning.PARTIAL,
        exact=ns.exact,
        cfg_split=ns.cfg_split,
        reference=not ns.no_reference,
        out=Path(DEFAULT_OUT) if out is None else out,
        report=report,
        timeout_s=ns.timeout_s,
        debug=ns.debug,
        world=world,
        rank=rank,
        prompts=prompts,
        out_dir=out_dir,
        group_size=group,
        vae=VAEPlacement.PARALLEL if ns.vae is None else VAEPlacement(ns.vae),
    )
