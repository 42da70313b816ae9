"""Train pcpp's tiny text-to-image model on synthetic coloured shapes (fresh data at every step).

Run from a checkout (``src`` on the path)::

    PYTHONPATH=src python scripts/train_tiny.py --out out/tiny --seed 0 --time-budget-min 7.5

Writes into ``--out``: ``weights/`` (the layout :func:`pcpp.models.load_tiny` reads: ``unet/`` safetensors +
config, ``text_encoder.safetensors`` + ``.json``, ``scheduler/``), ``train_log.txt`` (every logged line, losses
included), ``grid.png`` (prompts x sample sizes) and ``summary.json``.

Data, initialisation, timesteps and noise all derive from ``--seed``. With ``--time-budget-min`` the script first
times a few steps on throwaway copies of the model, then fixes the number of steps to fit the budget and logs it;
``--steps N`` reruns exactly that schedule. Runs on CUDA (bf16 autocast) when available, else on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcpp.models import (
    DEFAULT_GUIDANCE,
    SceneBatch,
    TinyModel,
    TinyTextEncoder,
    TinyTextEncoderConfig,
    build_scheduler,
    build_unet,
    render_scenes,
    sample,
    sample_scenes,
    save_tiny,
    scene_captions,
    unet_config,
)
from pcpp.models.check import read_colors, total_variation
from pcpp.models.imageio import image_grid, save_png

logger = logging.getLogger("train_tiny")

GRID_PROMPTS = (
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a green ring on a pink background",
    "an orange cross on a cyan background",
    "a white square on purple and green stripes",
    "a blue diamond on yellow and white stripes",
    "a red square and a blue circle on a white background",
    "a purple triangle and a yellow circle and a white cross on black and orange stripes",
)
GRID_SIZES = (32, 64, 128, 256)


@dataclass
class Trainer:
    """Models, optimizer and random sources of one training run."""

    unet: nn.Module
    text_encoder: TinyTextEncoder
    ema_unet: nn.Module
    ema_text_encoder: TinyTextEncoder
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    noise_gen: torch.Generator
    device: torch.device
    batch_size: int
    cond_drop: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments (``sys.argv[1:]`` if None).

    Returns:
        The options.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/tiny"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides --time-budget-min)")
    p.add_argument("--time-budget-min", type=float, default=7.5, help="pick --steps to fit this many minutes")
    p.add_argument("--deadline-min", type=float, default=None, help="stop training (and save) after this long")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64], help="training resolutions")
    p.add_argument("--size-weights", type=float, nargs="+", default=[1.0, 1.0, 2.0])
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-drop", type=float, default=0.1, help="share of captions replaced by the empty prompt")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--bench-steps", type=int, default=8)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--grid-sizes", type=int, nargs="+", default=list(GRID_SIZES))
    p.add_argument("--eval-count", type=int, default=64, help="single-shape prompts scored for colour")
    args = p.parse_args(argv)
    if len(args.sizes) != len(args.size_weights):
        p.error("--sizes and --size-weights differ in length")
    if any(s % 4 for s in args.sizes):
        p.error("--sizes must be multiples of 4")
    return args


def setup_logging(out: Path) -> None:
    """Logs to stdout and to ``out/train_log.txt``.

    Args:
        out: Output folder (created).
    """
    out.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / "train_log.txt", mode="w")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``base * min_ratio``.

    Args:
        step: Current step (0-based).
        total: Total steps.
        base: Peak learning rate.
        warmup: Warm-up steps.
        min_ratio: Final learning rate as a share of ``base``.

    Returns:
        The learning rate.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batch(trainer: Trainer, size: int) -> tuple[Tensor, list[str]]:
    """Draws fresh scenes and renders them.

    Args:
        trainer: Holds the data generator, device and batch size.
        size: Image side in pixels.

    Returns:
        Images in [-1, 1] on the device and their captions (some replaced by ``""``).
    """
    scenes = sample_scenes(trainer.batch_size, trainer.data_gen)
    captions = scene_captions(scenes)
    drop = (torch.rand(trainer.batch_size, generator=trainer.data_gen) < trainer.cond_drop).tolist()
    captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
    if trainer.device.type == "cuda":
        fields = {k: getattr(scenes, k).pin_memory() for k in scenes.__dataclass_fields__}
        scenes = SceneBatch(**{k: v.to(trainer.device, non_blocking=True) for k, v in fields.items()})
    else:
        scenes = scenes.to(trainer.device)
    return render_scenes(scenes, size, size) * 2 - 1, captions


def train_step(trainer: Trainer, size: int, lr: float, ema_decay: float, scheduler: diffusers.DDIMScheduler) -> Tensor:
    """One optimizer step on a fresh batch; updates the EMA copies.

    Args:
        trainer: The run's state.
        size: Image side in pixels.
        lr: Learning rate for this step.
        ema_decay: EMA decay for this step.
        scheduler: Noise schedule (for ``add_noise`` and ``get_velocity``).

    Returns:
        The step's loss (a 0-dim tensor on the device, not synchronised).
    """
    x0, captions = make_batch(trainer, size)
    ids = trainer.text_encoder.tokenizer()(captions).to(trainer.device, non_blocking=True)
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=trainer.noise_gen, device=x0.device)
    noise = torch.randn(x0.shape, generator=trainer.noise_gen, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    target = scheduler.get_velocity(x0, noise, t)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.device.type == "cuda"):
        context = trainer.text_encoder(ids)
        pred = trainer.unet(x_t, t, encoder_hidden_states=context).sample
    loss = F.mse_loss(pred.float(), target)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    trainer.optimizer.step()
    with torch.no_grad():
        for ema, live in ((trainer.ema_unet, trainer.unet), (trainer.ema_text_encoder, trainer.text_encoder)):
            ema_p = list(ema.parameters())
            torch._foreach_lerp_(ema_p, list(live.parameters()), 1.0 - ema_decay)
    return loss.detach()


def new_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    """Builds models, EMA copies, optimizer and generators, all from ``args.seed``.

    Args:
        args: Options.
        device: Training device.

    Returns:
        The trainer.
    """
    torch.manual_seed(args.seed)
    max_size = max(args.sizes)
    unet = build_unet(unet_config(sample_size=max_size)).to(device)
    text_encoder = TinyTextEncoder(TinyTextEncoderConfig()).to(device)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).requires_grad_(False)
    decay, no_decay = [], []
    for module in (unet, text_encoder):
        for p in module.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        fused=device.type == "cuda",
    )
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    return Trainer(
        unet=unet,
        text_encoder=text_encoder,
        ema_unet=ema_unet,
        ema_text_encoder=ema_te,
        optimizer=optimizer,
        data_gen=torch.Generator().manual_seed(args.seed + 1),
        noise_gen=noise_gen,
        device=device,
        batch_size=args.batch_size,
        cond_drop=args.cond_drop,
    )


def sync(device: torch.device) -> None:
    """Waits for the device's queued work.

    Args:
        device: The device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(args: argparse.Namespace, device: torch.device, scheduler: diffusers.DDIMScheduler) -> dict[int, float]:
    """Times training steps per resolution on a throwaway trainer (the real run starts fresh).

    Args:
        args: Options.
        device: Training device.
        scheduler: Noise schedule.

    Returns:
        Seconds per step for each training size.
    """
    bench_args = copy.copy(args)
    bench_args.seed = args.seed + 1000
    trainer = new_trainer(bench_args, device)
    seconds = {}
    for size in args.sizes:
        for _ in range(3):
            train_step(trainer, size, args.lr * 0.01, 0.99, scheduler)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.bench_steps):
            train_step(trainer, size, args.lr * 0.01, 0.99, scheduler)
        sync(device)
        seconds[size] = (time.perf_counter() - start) / args.bench_steps
        logger.info("benchmark: %dpx batch %d: %.1f ms/step", size, args.batch_size, 1000 * seconds[size])
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def as_model(trainer: Trainer, scheduler: diffusers.DDIMScheduler) -> TinyModel:
    """Wraps the EMA weights as a :class:`TinyModel` for sampling.

    Args:
        trainer: The run's state.
        scheduler: The scheduler.

    Returns:
        The model (in eval mode).
    """
    trainer.ema_unet.eval()
    trainer.ema_text_encoder.eval()
    return TinyModel(
        unet=trainer.ema_unet,
        text_encoder=trainer.ema_text_encoder,
        tokenizer=trainer.ema_text_encoder.tokenizer(),
        scheduler=scheduler,
    )


def evaluate(model: TinyModel, count: int, sizes: Sequence[int], seed: int) -> dict[str, dict[str, float]]:
    """Scores colour faithfulness on single-shape, plain-background prompts.

    Args:
        model: The model.
        count: Scenes drawn (only those with one shape on a plain background are used).
        sizes: Image sides to sample at.
        seed: Seed of the prompts and of the sampling noise.

    Returns:
        Per size: background and object colour accuracy (see :func:`pcpp.models.check.read_colors`) and mean
        total variation.
    """
    scenes = sample_scenes(count, torch.Generator().manual_seed(seed))
    keep = ((scenes.n_objects == 1) & ~scenes.striped).tolist()
    captions = [c for c, k in zip(scene_captions(scenes), keep, strict=True) if k]
    truth = [(c.split()[-2], c.split()[1]) for c in captions]  # (background, object) colour words
    results = {}
    for size in sizes:
        images = sample(model, captions, height=size, width=size, seed=seed).cpu()
        readings = [read_colors(img) for img in images]
        bg_ok = sum(r.background == bg for r, (bg, _) in zip(readings, truth, strict=True)) / len(captions)
        fg_ok = sum(r.foreground == fg for r, (_, fg) in zip(readings, truth, strict=True)) / len(captions)
        tv = sum(total_variation(img) for img in images) / len(images)
        results[str(size)] = {"background_acc": bg_ok, "object_acc": fg_ok, "total_variation": tv}
        logger.info(
            "eval %dpx (%d prompts): background colour %.0f%%, object colour %.0f%%, total variation %.3f",
            size,
            len(captions),
            100 * bg_ok,
            100 * fg_ok,
            tv,
        )
    return results


def write_grid(model: TinyModel, path: Path, sizes: Sequence[int], seed: int) -> None:
    """Samples :data:`GRID_PROMPTS` at each size and saves the grid (rows: prompts, columns: sizes).

    Args:
        model: The model.
        path: PNG file to write.
        sizes: Image sides (columns).
        seed: Sampling seed.
    """
    columns = [sample(model, list(GRID_PROMPTS), height=s, width=s, seed=seed).cpu() for s in sizes]
    rows = [[col[i] for col in columns] for i in range(len(GRID_PROMPTS))]
    save_png(image_grid(rows, cell=max(sizes)), path)
    logger.info("wrote %s", path)


def main(argv: Sequence[str] | None = None) -> None:
    """Trains, saves, evaluates and draws the sample grid.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` if None).
    """
    args = parse_args(argv)
    setup_logging(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    logger.info("command: %s", " ".join(sys.argv))
    logger.info(
        "python %s, torch %s, diffusers %s, device %s",
        platform.python_version(),
        torch.__version__,
        diffusers.__version__,
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scheduler = build_scheduler()
    size_probs = torch.tensor(args.size_weights) / sum(args.size_weights)

    steps = args.steps
    if steps is None:
        per_size = benchmark(args, device, scheduler)
        mean_step = sum(float(p) * per_size[s] for s, p in zip(args.sizes, size_probs, strict=True))
        steps = max(1, int(args.time_budget_min * 60 / mean_step))
        logger.info("chosen --steps %d to fit %.1f min (%.1f ms/step expected)", steps, args.time_budget_min,
                    1000 * mean_step)
    deadline_s = 60 * (args.deadline_min if args.deadline_min is not None else 1e9)

    trainer = new_trainer(args, device)
    n_unet = sum(p.numel() for p in trainer.unet.parameters())
    n_te = sum(p.numel() for p in trainer.text_encoder.parameters())
    logger.info("unet %.2fM params, text encoder %.2fM params", n_unet / 1e6, n_te / 1e6)
    logger.info("options: %s", json.dumps({k: str(v) for k, v in vars(args).items()}, sort_keys=True))
    logger.info("training %d steps, batch %d, sizes %s with weights %s", steps, args.batch_size, args.sizes,
                args.size_weights)
    size_gen = torch.Generator().manual_seed(args.seed + 3)
    size_index = torch.multinomial(size_probs, steps, replacement=True, generator=size_gen).tolist()
    trainer.unet.train()
    trainer.text_encoder.train()
    window: list[tuple[int, Tensor]] = []
    history: list[tuple[int, float]] = []  # (size, loss) of every step, read back in chunks
    start = time.perf_counter()
    done = 0
    for step in range(steps):
        size = args.sizes[size_index[step]]
        lr = lr_at(step, steps, args.lr, args.warmup, args.min_lr_ratio)
        decay = min(args.ema, (1 + step) / (10 + step))
        window.append((size, train_step(trainer, size, lr, decay, scheduler)))
        done = step + 1
        if done % args.log_every == 0 or done == steps:
            losses = torch.stack([loss for _, loss in window]).float().cpu().tolist()
            history.extend((s, v) for (s, _), v in zip(window, losses, strict=True))
            window.clear()
            elapsed = time.perf_counter() - start
            recent = losses[-args.log_every :]
            if not all(math.isfinite(v) for v in recent):
                raise RuntimeError(f"non-finite loss at step {done}")
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.1f img/s elapsed %.0fs",
                done,
                steps,
                sum(recent) / len(recent),
                lr,
                done * args.batch_size / elapsed,
                elapsed,
            )
            if elapsed > deadline_s and done < steps:
                logger.warning("deadline reached: stopping at step %d of %d", done, steps)
                break
    train_s = time.perf_counter() - start
    tail = history[-max(1, len(history) // 10) :]
    final_loss = sum(v for _, v in tail) / len(tail)
    per_size_final = {
        str(s): sum(v for z, v in tail if z == s) / max(1, sum(1 for z, _ in tail if z == s)) for s in args.sizes
    }
    logger.info("trained %d steps in %.1f s; final loss (mean of last %d steps) %.4f; per size %s", done, train_s,
                len(tail), final_loss, json.dumps(per_size_final))

    save_tiny(args.out / "weights", trainer.ema_unet, trainer.ema_text_encoder, scheduler)
    model = as_model(trainer, scheduler)
    eval_results = evaluate(model, args.eval_count, sorted({*args.sizes[:1], max(args.sizes), 2 * max(args.sizes)}),
                            seed=1234)
    write_grid(model, args.out / "grid.png", args.grid_sizes, seed=0)
    summary = {
        "steps": done,
        "planned_steps": steps,
        "train_seconds": train_s,
        "final_loss": final_loss,
        "final_loss_per_size": per_size_final,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "eval": eval_results,
        "default_guidance": DEFAULT_GUIDANCE,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("summary: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
