"""Synthetic "coloured shapes" images with captions: the training data of pcpp's tiny model.

A scene is one to three coloured shapes (circle, square, triangle, diamond, ring, cross) with soft drop shadows
and a little shading, on a plain background with a gentle brightness gradient or on two-coloured stripes at a
random angle. Every scene comes with a caption in a small closed vocabulary, for example
``"a red circle on a blue background"`` or ``"an orange ring and a white cross on green and black stripes"``.

Scenes are described in resolution-independent units (the unit square), so :func:`render_scenes` draws the same
scene at any size, with anti-aliased edges. Sampling is vectorised and deterministic given a
:class:`torch.Generator`, and rendering runs on any device, which lets the training script make fresh data on
the GPU at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import torch
from torch import Tensor

__all__ = [
    "COLORS",
    "MAX_OBJECTS",
    "SHAPES",
    "VOCABULARY",
    "SceneBatch",
    "render_scenes",
    "sample_scenes",
    "scene_captions",
    "shape_sdf",
]

COLORS: Final = MappingProxyType(
    {
        "red": (0.88, 0.12, 0.12),
        "orange": (1.00, 0.55, 0.05),
        "yellow": (0.97, 0.87, 0.12),
        "green": (0.13, 0.68, 0.22),
        "cyan": (0.10, 0.80, 0.85),
        "blue": (0.13, 0.25, 0.88),
        "purple": (0.52, 0.16, 0.72),
        "pink": (1.00, 0.52, 0.72),
        "white": (0.95, 0.95, 0.95),
        "black": (0.07, 0.07, 0.07),
    }
)
"""Colour name -> RGB in [0, 1]."""

SHAPES: Final = ("circle", "square", "triangle", "diamond", "ring", "cross")
"""The shape names, in the order of :attr:`SceneBatch.shape` indices."""

MAX_OBJECTS: Final = 3
"""Most shapes in one scene."""

VOCABULARY: Final = ("a", "an", "and", "on", "background", "stripes", *COLORS, *SHAPES)
"""Every word a caption (or a prompt to the tiny model) may use."""

_COLOR_NAMES: Final = tuple(COLORS)
_N_COLORS: Final = len(_COLOR_NAMES)


@dataclass(frozen=True)
class SceneBatch:
    """A batch of ``B`` scenes, each with :data:`MAX_OBJECTS` object slots (the first ``n_objects`` are used).

    Coordinates are in the unit square: x to the right, y downwards, ``(0.5, 0.5)`` the image centre.

    Attributes:
        n_objects: ``(B,)`` int64, shapes in each scene (1 to :data:`MAX_OBJECTS`).
        shape: ``(B, K)`` int64 indices into :data:`SHAPES`.
        color: ``(B, K)`` int64 indices into :data:`COLORS`.
        center: ``(B, K, 2)`` float centres ``(x, y)``.
        radius: ``(B, K)`` float sizes (about half the shape's width).
        bg_color: ``(B,)`` int64 background colour (first stripe colour when striped).
        bg_color2: ``(B,)`` int64 second stripe colour (unused unless striped).
        striped: ``(B,)`` bool, stripes instead of a plain background.
        stripe_angle: ``(B,)`` float stripe direction in radians.
        stripe_period: ``(B,)`` float stripe period in image units.
        stripe_phase: ``(B,)`` float stripe phase in [0, 1).
        gradient: ``(B, 2)`` float brightness gradient of the background (per image unit).
        jitter: ``(B, K + 2, 3)`` float small colour perturbations (objects, then the two background colours).
    """

    n_objects: Tensor
    shape: Tensor
    color: Tensor
    center: Tensor
    radius: Tensor
    bg_color: Tensor
    bg_color2: Tensor
    striped: Tensor
    stripe_angle: Tensor
    stripe_period: Tensor
    stripe_phase: Tensor
    gradient: Tensor
    jitter: Tensor

    def __len__(self) -> int:
        """Returns the number of scenes."""
        return int(self.n_objects.shape[0])

    def to(self, device: torch.device | str) -> SceneBatch:
        """Returns the same scenes with every tensor on ``device``.

        Args:
            device: Target device.

        Returns:
            A new :class:`SceneBatch`.
        """
        return SceneBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def _uniform(n: tuple[int, ...], low: float | Tensor, high: float | Tensor, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _pick_excluding(excluded: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform colour indices that differ from every column of ``excluded`` (``(B, E)`` with distinct rows)."""
    b, e = excluded.shape
    idx = torch.randint(0, _N_COLORS - e, (b,), generator=generator)
    for col in torch.sort(excluded, dim=1).values.unbind(1):
        idx = idx + (idx >= col).long()
    return idx


def sample_scenes(n: int, generator: torch.Generator) -> SceneBatch:
    """Draws ``n`` random scenes (on the CPU), deterministically from ``generator``.

    Half the scenes hold one shape, 35% two and 15% three; several shapes sit in distinct cells of a 2x2 grid,
    so they do not overlap. 40% of the backgrounds are striped. Shapes never share a colour with the background.

    Args:
        n: Number of scenes.
        generator: A CPU :class:`torch.Generator`; the same seed gives the same scenes.

    Returns:
        The scenes.

    Raises:
        ValueError: If ``n`` is not positive.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    k = MAX_OBJECTS
    u = torch.rand(n, generator=generator)
    n_objects = 1 + (u >= 0.5).long() + (u >= 0.85).long()

    bg_color = torch.randint(0, _N_COLORS, (n,), generator=generator)
    bg_color2 = _pick_excluding(bg_color[:, None], generator)
    striped = torch.rand(n, generator=generator) < 0.4
    # Both candidates are drawn for every scene (simple and vectorised); the background kind picks one.
    both = torch.stack([bg_color, bg_color2], 1)
    color_striped = torch.stack([_pick_excluding(both, generator) for _ in range(k)], 1)
    color_plain = torch.stack([_pick_excluding(bg_color[:, None], generator) for _ in range(k)], 1)
    color = torch.where(striped[:, None], color_striped, color_plain)
    shape = torch.randint(0, len(SHAPES), (n, k), generator=generator)

    # Sizes: one shape may be big; with several they share the canvas.
    r_lo = torch.tensor([0.14, 0.11, 0.09])[n_objects - 1]
    r_hi = torch.tensor([0.32, 0.20, 0.16])[n_objects - 1]
    radius = _uniform((n, k), r_lo[:, None], r_hi[:, None], generator)
    # Single shape: anywhere it fits. Several: distinct cells of a 2x2 grid, anywhere the shape fits in its cell.
    margin = 1.02 * radius
    single = _uniform((n, k, 2), margin[..., None], 1.0 - margin[..., None], generator)
    cells = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)[:, :k]
    cell_xy = torch.stack([cells % 2, cells // 2], -1).float() * 0.5
    in_cell = _uniform((n, k, 2), 0.8 * margin[..., None], 0.5 - 0.8 * margin[..., None], generator)
    center = torch.where((n_objects > 1)[:, None, None], cell_xy + in_cell, single)

    stripe_angle = _uniform((n,), 0.0, math.pi, generator)
    stripe_period = _uniform((n,), 0.12, 0.35, generator)
    stripe_phase = torch.rand(n, generator=generator)
    gradient = _uniform((n, 2), -0.25, 0.25, generator)
    jitter = _uniform((n, k + 2, 3), -0.05, 0.05, generator)
    return SceneBatch(
        n_objects=n_objects,
        shape=shape,
        color=color,
        center=center,
        radius=radius,
        bg_color=bg_color,
        bg_color2=bg_color2,
        striped=striped,
        stripe_angle=stripe_angle,
        stripe_period=stripe_period,
        stripe_phase=stripe_phase,
        gradient=gradient,
        jitter=jitter,
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_captions(scenes: SceneBatch) -> list[str]:
    """Describes each scene in words from :data:`VOCABULARY`.

    Args:
        scenes: The scenes.

    Returns:
        One caption per scene, e.g. ``"a red circle and a blue square on yellow and black stripes"``.
    """
    n_objects = scenes.n_objects.tolist()
    shape = scenes.shape.tolist()
    color = scenes.color.tolist()
    bg = scenes.bg_color.tolist()
    bg2 = scenes.bg_color2.tolist()
    striped = scenes.striped.tolist()
    captions = []
    for i in range(len(n_objects)):
        objects = []
        for j in range(n_objects[i]):
            c = _COLOR_NAMES[color[i][j]]
            objects.append(f"{_article(c)} {c} {SHAPES[shape[i][j]]}")
        if striped[i]:
            where = f"on {_COLOR_NAMES[bg[i]]} and {_COLOR_NAMES[bg2[i]]} stripes"
        else:
            where = f"on {_article(_COLOR_NAMES[bg[i]])} {_COLOR_NAMES[bg[i]]} background"
        captions.append(" and ".join(objects) + " " + where)
    return captions


def _box(px: Tensor, py: Tensor, hx: Tensor | float, hy: Tensor | float) -> Tensor:
    qx = px.abs() - hx
    qy = py.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _triangle(px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Signed distance to an upright equilateral triangle of half-side ``r`` centred on its centroid."""
    k = math.sqrt(3.0)
    x = px.abs() - r
    y = -py + r / k  # image y points down; the formula wants y up
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * r), torch.zeros_like(x))
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


def shape_sdf(shape: Tensor, px: Tensor, py: Tensor, r: Tensor) -> Tensor:
    """Signed distance (negative inside) to each scene's shape, in the units of the coordinates.

    Args:
        shape: ``(B,)`` int64 indices into :data:`SHAPES`.
        px: ``(B, H, W)`` x offsets from each shape's centre.
        py: ``(B, H, W)`` y offsets (downwards) from each shape's centre.
        r: ``(B, 1, 1)`` shape radii.

    Returns:
        ``(B, H, W)`` signed distances.
    """
    dist = torch.sqrt(px * px + py * py)
    sdfs = torch.stack(
        [
            dist - r,  # circle
            _box(px, py, 0.85 * r, 0.85 * r),  # square
            _triangle(px, py - 0.32 * r, 1.1 * r),  # triangle, its bounding box centred
            _box((px + py) / math.sqrt(2), (px - py) / math.sqrt(2), 0.78 * r, 0.78 * r),  # diamond
            (dist - 0.7 * r).abs() - 0.3 * r,  # ring
            torch.minimum(_box(px, py, r, 0.32 * r), _box(px, py, 0.32 * r, r)),  # cross
        ],
        0,
    )
    index = shape.view(1, -1, 1, 1).expand(1, *px.shape)
    return torch.gather(sdfs, 0, index)[0]


def render_scenes(scenes: SceneBatch, height: int, width: int) -> Tensor:
    """Draws the scenes at ``height x width`` pixels on the scenes' device.

    The unit square of scene coordinates is fitted to the shorter side and centred; a non-square image shows more
    background along its longer side. Edges are anti-aliased at any size.

    Args:
        scenes: The scenes (all tensors on one device).
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        ``(B, 3, height, width)`` float32 images in [0, 1].

    Raises:
        ValueError: If ``height`` or ``width`` is not positive.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    device = scenes.n_objects.device
    b = len(scenes)
    scale = float(min(height, width))  # pixels per image unit
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2) / scale + 0.5
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2) / scale + 0.5
    y = ys.view(1, height, 1).expand(b, height, width)
    x = xs.view(1, 1, width).expand(b, height, width)
    palette = torch.tensor(list(COLORS.values()), device=device, dtype=torch.float32)

    def col(index: Tensor, jitter: Tensor) -> Tensor:
        return (palette[index] + jitter).clamp(0, 1).view(b, 3, 1, 1)

    # Background: plain with a brightness gradient, or soft-edged stripes.
    c1 = col(scenes.bg_color, scenes.jitter[:, -2])
    c2 = col(scenes.bg_color2, scenes.jitter[:, -1])
    angle = scenes.stripe_angle.view(b, 1, 1)
    period = scenes.stripe_period.view(b, 1, 1)
    along = (x * torch.cos(angle) + y * torch.sin(angle)) / period + scenes.stripe_phase.view(b, 1, 1)
    # sin(2 pi u) * period / (2 pi) is the distance to the nearest stripe edge near that edge.
    edge = torch.sin(2 * math.pi * along) * period / (2 * math.pi) * scale
    stripe = (0.5 + edge).clamp(0, 1).unsqueeze(1)
    striped_bg = c1 * stripe + c2 * (1 - stripe)
    g = scenes.gradient.view(b, 2, 1, 1)
    shade = 1 + g[:, 0:1] * (x.unsqueeze(1) - 0.5) + g[:, 1:2] * (y.unsqueeze(1) - 0.5)
    plain_bg = (c1 * shade).clamp(0, 1)
    image = torch.where(scenes.striped.view(b, 1, 1, 1), striped_bg, plain_bg)

    # Shapes, in slot order: soft shadow, then the anti-aliased shape with light from the top left.
    for k in range(MAX_OBJECTS):
        active = (scenes.n_objects > k).float().view(b, 1, 1, 1)
        cx = scenes.center[:, k, 0].view(b, 1, 1)
        cy = scenes.center[:, k, 1].view(b, 1, 1)
        r = scenes.radius[:, k].view(b, 1, 1)
        shape = scenes.shape[:, k]
        offset = 0.12 * r
        d_shadow = shape_sdf(shape, x - cx - offset, y - cy - offset, r)
        shadow = 0.35 * torch.sigmoid(-d_shadow / (0.08 * r)).unsqueeze(1) * active
        image = image * (1 - shadow)
        d = shape_sdf(shape, x - cx, y - cy, r)
        cover = (0.5 - d * scale).clamp(0, 1).unsqueeze(1) * active
        light = 1 + 0.12 * (-(x - cx) - (y - cy)).unsqueeze(1) / r.unsqueeze(1)
        fill = (col(scenes.color[:, k], scenes.jitter[:, k]) * light).clamp(0, 1)
        image = image * (1 - cover) + fill * cover
    return image
