"""Train pcpp's tiny text-to-image model on synthetic coloured shapes.

Run from a checkout (``src`` on the path). The shipped weights (``src/pcpp/models/weights``) came from::

    PYTHONPATH=src python scripts/train_tiny.py --out out/tiny --seed 0 --time-budget-min 7.3 --deadline-min 7.9

on one H100, where the timing picked ``--steps 2903``; add ``--steps 2903`` to rerun that exact schedule.

Writes into ``--out``: ``weights/`` (the layout :func:`pcpp.models.load_tiny` reads: ``unet/`` safetensors +
config, ``text_encoder.safetensors`` + ``.json``, ``scheduler/``), ``train_log.txt`` (every logged line, losses
included), ``grid.png`` (prompts x sample sizes) and ``summary.json``. ``--eval-only DIR`` scores existing weights
and draws their grid instead of training.

Data. By default (``--pool-size 0``) every step draws fresh scenes on the CPU and renders them on the training
device, at a size drawn per step from ``--sizes`` (weighted by ``--size-weights``). With ``--pool-size N`` and a
single size, ``N`` scenes are rendered once up front and kept on the device as uint8, and steps sample from that
pool (this was tried; it was not faster on an H100, where the step is bound by the UNet itself).

Data, initialisation, size schedule, timesteps and noise all derive from ``--seed``. With ``--time-budget-min``
the script first times a few steps on a throwaway copy of the model, then fixes the number of steps to fit the
budget and logs it; ``--steps N`` reruns exactly that schedule (bit-for-bit only on the same hardware and software:
cuDNN picks its algorithms by timing). Runs on CUDA (bf16 autocast) when available, else on CPU.
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
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcpp.models import (
    COLORS,
    DEFAULT_GUIDANCE,
    VOCABULARY,
    SceneBatch,
    TinyModel,
    TinyTextEncoder,
    TinyTextEncoderConfig,
    TinyTokenizer,
    build_scheduler,
    build_unet,
    load_tiny,
    render_scenes,
    sample,
    sample_scenes,
    save_tiny,
    scene_captions,
    unet_config,
)
from pcpp.models.check import nearest_colors, read_colors, read_shape, total_variation
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


@dataclass
class Trainer:
    """Models, optimizer and step-level random source of one training run."""

    unet: nn.Module
    text_encoder: TinyTextEncoder
    ema_unet: nn.Module
    ema_text_encoder: TinyTextEncoder
    optimizer: torch.optim.Optimizer
    noise_gen: torch.Generator
    device: torch.device
    batch_size: int
    cond_drop: float


class FreshData:
    """Fresh scenes at every step, drawn on the CPU from their own generator and rendered on the device.

    Args:
        seed: Seed of the scenes and of the caption drop-out.
        max_length: Tokens per caption.
    """

    def __init__(self, seed: int, max_length: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.tokenizer = TinyTokenizer(VOCABULARY, max_length)

    def batch(self, trainer: Trainer, size: int) -> tuple[Tensor, Tensor]:
        """Draws and renders one batch.

        Args:
            trainer: Holds the device, batch size and caption drop rate.
            size: Image side in pixels.

        Returns:
            Images in [-1, 1] and token ids (a ``cond_drop`` share of the captions replaced by ``""``).
        """
        scenes = sample_scenes(trainer.batch_size, self.gen)
        captions = scene_captions(scenes)
        drop = (torch.rand(trainer.batch_size, generator=self.gen) < trainer.cond_drop).tolist()
        captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        if trainer.device.type == "cuda":
            fields = {k: getattr(scenes, k).pin_memory() for k in scenes.__dataclass_fields__}
            scenes = SceneBatch(**{k: v.to(trainer.device, non_blocking=True) for k, v in fields.items()})
        else:
            scenes = scenes.to(trainer.device)
        ids = self.tokenizer(captions).to(trainer.device, non_blocking=True)
        return render_scenes(scenes, size, size) * 2 - 1, ids


class PoolData:
    """A fixed pool of scenes rendered once on the device (uint8); steps draw from it with ``trainer.noise_gen``.

    Args:
        count: Number of scenes.
        size: Image side in pixels.
        seed: Seed of the scenes.
        device: Where to render and keep them.
        max_length: Tokens per caption.
    """

    def __init__(self, count: int, size: int, seed: int, device: torch.device, max_length: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        tokenizer = TinyTokenizer(VOCABULARY, max_length)
        images, ids = [], []
        chunk = 4096
        for start in range(0, count, chunk):
            scenes = sample_scenes(min(chunk, count - start), gen)
            ids.append(tokenizer(scene_captions(scenes)))
            rendered = render_scenes(scenes.to(device), size, size)
            images.append((rendered * 255).round().to(torch.uint8))
        self.size = size
        self.images = torch.cat(images)
        self.token_ids = torch.cat(ids).to(device)
        self.empty_ids = tokenizer([""])[0].to(device)

    def batch(self, trainer: Trainer, size: int) -> tuple[Tensor, Tensor]:
        """Draws one batch from the pool (on the device, without synchronising).

        Args:
            trainer: Holds the random source, batch size and caption drop rate.
            size: Image side in pixels; must be the pool's.

        Returns:
            Images in [-1, 1] and token ids (a ``cond_drop`` share of them replaced by the empty prompt).

        Raises:
            ValueError: If ``size`` is not the pool's size.
        """
        if size != self.size:
            raise ValueError(f"the pool holds {self.size}px images, not {size}px")
        n = self.images.shape[0]
        idx = torch.randint(0, n, (trainer.batch_size,), generator=trainer.noise_gen, device=trainer.device)
        x0 = self.images[idx].float() / 127.5 - 1
        drop = torch.rand(trainer.batch_size, generator=trainer.noise_gen, device=trainer.device) < trainer.cond_drop
        ids = torch.where(drop[:, None], self.empty_ids, self.token_ids[idx])
        return x0, ids


Data = FreshData | PoolData


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
    p.add_argument("--time-budget-min", type=float, default=7.3, help="pick --steps to fit this many minutes")
    p.add_argument("--deadline-min", type=float, default=None, help="stop training (and save) after this long")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64], help="training resolutions")
    p.add_argument("--size-weights", type=float, nargs="+", default=[1.0, 1.0, 2.0])
    p.add_argument("--pool-size", type=int, default=0, help="pre-rendered scenes (0: fresh scenes every step)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-drop", type=float, default=0.1, help="share of captions replaced by the empty prompt")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--bench-steps", type=int, default=8)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--init-from", type=Path, default=None, help="start from these weights (load_tiny layout)")
    p.add_argument("--eval-only", type=Path, default=None, help="score these weights and draw the grid; no training")
    p.add_argument("--eval-count", type=int, default=128, help="scenes drawn for the eval (single-shape ones used)")
    p.add_argument("--eval-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--grid-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="guidance for the eval and grid")
    args = p.parse_args(argv)
    if len(args.sizes) != len(args.size_weights):
        p.error("--sizes and --size-weights differ in length")
    if any(s % 4 for s in [*args.sizes, *args.eval_sizes, *args.grid_sizes]):
        p.error("image sizes must be multiples of 4")
    if args.pool_size and len(args.sizes) != 1:
        p.error("--pool-size needs a single --sizes value")
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


def train_step(trainer: Trainer, data: Data, size: int, lr: float, ema_decay: float, scheduler: Any) -> Tensor:
    """One optimizer step on a new batch; updates the EMA copies.

    Args:
        trainer: The run's state.
        data: The training data.
        size: Image side in pixels.
        lr: Learning rate for this step.
        ema_decay: EMA decay for this step.
        scheduler: Noise schedule (for ``add_noise`` and ``get_velocity``).

    Returns:
        The step's loss (a 0-dim tensor on the device, not synchronised).
    """
    x0, ids = data.batch(trainer, size)
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
            ema_p: list[Tensor] = list(ema.parameters())
            live_p: list[Tensor] = list(live.parameters())
            torch._foreach_lerp_(ema_p, live_p, 1.0 - ema_decay)
    return loss.detach()


def new_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    """Builds models, EMA copies, optimizer and the step generator, all from ``args.seed``.

    Args:
        args: Options.
        device: Training device.

    Returns:
        The trainer.
    """
    torch.manual_seed(args.seed)
    unet: nn.Module = build_unet(unet_config(sample_size=max(args.sizes))).to(device)
    text_encoder = TinyTextEncoder(TinyTextEncoderConfig()).to(device)
    if args.init_from is not None:
        start = load_tiny(device, directory=args.init_from)
        unet.load_state_dict(start.unet.state_dict())
        text_encoder.load_state_dict(start.text_encoder.state_dict())
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_te = copy.deepcopy(text_encoder).requires_grad_(False)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in (unet, text_encoder):
        for p in module.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        fused=device.type == "cuda",
    )
    return Trainer(
        unet=unet,
        text_encoder=text_encoder,
        ema_unet=ema_unet,
        ema_text_encoder=ema_te,
        optimizer=optimizer,
        noise_gen=torch.Generator(device=device).manual_seed(args.seed + 2),
        device=device,
        batch_size=args.batch_size,
        cond_drop=args.cond_drop,
    )


def new_data(args: argparse.Namespace, seed: int, device: torch.device) -> Data:
    """Creates the data source the options ask for.

    Args:
        args: Options.
        seed: Seed of the scenes.
        device: Training device.

    Returns:
        Fresh-scene data, or a pre-rendered pool when ``--pool-size`` is set.
    """
    max_length = TinyTextEncoderConfig().max_length
    if not args.pool_size:
        return FreshData(seed, max_length)
    start = time.perf_counter()
    pool = PoolData(args.pool_size, args.sizes[0], seed, device, max_length)
    logger.info(
        "rendered %d scenes at %dpx in %.1f s (%.2f GB)",
        args.pool_size,
        args.sizes[0],
        time.perf_counter() - start,
        pool.images.numel() / 1e9,
    )
    return pool


def sync(device: torch.device) -> None:
    """Waits for the device's queued work.

    Args:
        device: The device.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(args: argparse.Namespace, device: torch.device, data: Data, scheduler: Any) -> dict[int, float]:
    """Times training steps per size on a throwaway trainer (the real run starts fresh).

    Args:
        args: Options.
        device: Training device.
        data: Data for the timed steps (a pool is shared with the real run: drawing from it consumes nothing the
            run uses; fresh data must be a throwaway source).
        scheduler: Noise schedule.

    Returns:
        Seconds per step for each training size.
    """
    bench_args = copy.copy(args)
    bench_args.seed = args.seed + 1000
    bench_args.init_from = None
    trainer = new_trainer(bench_args, device)
    seconds = {}
    for size in args.sizes:
        for _ in range(3):
            train_step(trainer, data, size, args.lr * 0.01, 0.99, scheduler)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.bench_steps):
            train_step(trainer, data, size, args.lr * 0.01, 0.99, scheduler)
        sync(device)
        seconds[size] = (time.perf_counter() - start) / args.bench_steps
        logger.info("benchmark: %dpx batch %d: %.1f ms/step", size, args.batch_size, 1000 * seconds[size])
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def as_model(trainer: Trainer, scheduler: Any) -> TinyModel:
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


def evaluate(
    model: TinyModel, count: int, sizes: Sequence[int], seed: int, guidance: float = DEFAULT_GUIDANCE
) -> dict[str, dict[str, float]]:
    """Scores prompt faithfulness on single-shape, plain-background prompts.

    Background and object colour are read with :func:`pcpp.models.check.read_colors`; the shape with
    :func:`pcpp.models.check.read_shape` on the pixels of the prompt's object colour.

    Args:
        model: The model.
        count: Scenes drawn (only those with one shape on a plain background are used).
        sizes: Image sides to sample at.
        seed: Seed of the prompts and of the sampling noise.
        guidance: Classifier-free guidance scale.

    Returns:
        Per size: background colour, object colour and shape accuracy, mean shape IoU and mean total variation.
    """
    scenes = sample_scenes(count, torch.Generator().manual_seed(seed))
    keep = ((scenes.n_objects == 1) & ~scenes.striped).tolist()
    captions = [c for c, k in zip(scene_captions(scenes), keep, strict=True) if k]
    truth = [(c.split()[-2], c.split()[1], c.split()[2]) for c in captions]  # background, object colour, shape
    results = {}
    for size in sizes:
        images = sample(model, captions, height=size, width=size, seed=seed, guidance=guidance).cpu()
        bg_ok = fg_ok = shape_ok = 0
        iou = 0.0
        for img, (bg, fg, shape) in zip(images, truth, strict=True):
            colors = read_colors(img)
            bg_ok += colors.background == bg
            fg_ok += colors.foreground == fg
            mask = nearest_colors(img.permute(1, 2, 0)) == list(COLORS).index(fg)
            reading = read_shape(mask)
            shape_ok += reading.shape == shape
            iou += reading.iou
        n = len(captions)
        tv = sum(total_variation(img) for img in images) / n
        results[str(size)] = {
            "background_acc": bg_ok / n,
            "object_color_acc": fg_ok / n,
            "shape_acc": shape_ok / n,
            "shape_iou": iou / n,
            "total_variation": tv,
        }
        logger.info(
            "eval %dpx (%d prompts, guidance %.1f): background colour %.0f%%, object colour %.0f%%, shape %.0f%% "
            "(mean IoU %.2f), total variation %.3f",
            size,
            n,
            guidance,
            100 * bg_ok / n,
            100 * fg_ok / n,
            100 * shape_ok / n,
            iou / n,
            tv,
        )
    return results


def write_grid(model: TinyModel, path: Path, sizes: Sequence[int], seed: int, guidance: float) -> None:
    """Samples :data:`GRID_PROMPTS` at each size and saves the grid (rows: prompts, columns: sizes).

    Args:
        model: The model.
        path: PNG file to write.
        sizes: Image sides (columns).
        seed: Sampling seed.
        guidance: Classifier-free guidance scale.
    """
    columns = [sample(model, list(GRID_PROMPTS), height=s, width=s, seed=seed, guidance=guidance).cpu() for s in sizes]
    rows = [[col[i] for col in columns] for i in range(len(GRID_PROMPTS))]
    save_png(image_grid(rows, cell=max(sizes)), path)
    logger.info("wrote %s", path)


def main(argv: Sequence[str] | None = None) -> None:
    """Trains, saves, evaluates and draws the sample grid (or only evaluates, with ``--eval-only``).

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
    if args.eval_only is not None:
        model = load_tiny(device, directory=args.eval_only)
        results = evaluate(model, args.eval_count, args.eval_sizes, 1234, args.guidance)
        write_grid(model, args.out / "grid.png", args.grid_sizes, 0, args.guidance)
        (args.out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        return
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scheduler = build_scheduler()
    size_probs = torch.tensor(args.size_weights) / sum(args.size_weights)
    data = new_data(args, args.seed + 1, device)

    steps = args.steps
    if steps is None:
        bench_data = data if isinstance(data, PoolData) else new_data(args, args.seed + 1001, device)
        per_size = benchmark(args, device, bench_data, scheduler)
        mean_step = sum(float(p) * per_size[s] for s, p in zip(args.sizes, size_probs, strict=True))
        steps = max(1, int(args.time_budget_min * 60 / mean_step))
        logger.info(
            "chosen --steps %d to fit %.1f min (%.1f ms/step expected)", steps, args.time_budget_min, 1000 * mean_step
        )
    deadline_s = 60 * (args.deadline_min if args.deadline_min is not None else 1e9)

    trainer = new_trainer(args, device)
    n_unet = sum(p.numel() for p in trainer.unet.parameters())
    n_te = sum(p.numel() for p in trainer.text_encoder.parameters())
    logger.info("unet %.2fM params, text encoder %.2fM params", n_unet / 1e6, n_te / 1e6)
    logger.info("options: %s", json.dumps({k: str(v) for k, v in vars(args).items()}, sort_keys=True))
    logger.info(
        "training %d steps, batch %d, sizes %s with weights %s", steps, args.batch_size, args.sizes, args.size_weights
    )
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
        window.append((size, train_step(trainer, data, size, lr, decay, scheduler)))
        done = step + 1
        if done % args.log_every == 0 or done == steps:
            losses = torch.stack([loss for _, loss in window]).float().cpu().tolist()
            history.extend((s, v) for (s, _), v in zip(window, losses, strict=True))
            window.clear()
            elapsed = time.perf_counter() - start
            if not all(math.isfinite(v) for v in losses):
                raise RuntimeError(f"non-finite loss at step {done}")
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.1f img/s elapsed %.0fs",
                done,
                steps,
                sum(losses) / len(losses),
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
    logger.info(
        "trained %d steps (%d images) in %.1f s; final loss (mean of the last %d steps) %.4f; per size %s",
        done,
        done * args.batch_size,
        train_s,
        len(tail),
        final_loss,
        json.dumps(per_size_final),
    )
    del data

    save_tiny(args.out / "weights", trainer.ema_unet, trainer.ema_text_encoder, scheduler)
    model = as_model(trainer, scheduler)
    eval_results = evaluate(model, args.eval_count, args.eval_sizes, 1234, args.guidance)
    write_grid(model, args.out / "grid.png", args.grid_sizes, 0, args.guidance)
    summary = {
        "steps": done,
        "planned_steps": steps,
        "train_seconds": train_s,
        "images_seen": done * args.batch_size,
        "final_loss": final_loss,
        "final_loss_per_size": per_size_final,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "eval": eval_results,
        "guidance": args.guidance,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("summary: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
