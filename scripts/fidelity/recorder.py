"""A forward hook that records the converted UNet's calls, and the eps error of those calls against one device."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pcpp.hooks import map_tensors

from .metrics import relative_l2, to_eps


def _unet_output(output: Any) -> Tensor:
    if isinstance(output, tuple):
        return output[0]
    sample: Tensor = output.sample if hasattr(output, "sample") else output["sample"]
    return sample


class Recorder:
    """A forward hook that keeps the inputs and guided outputs of some images' UNet calls after warmup.

    Register it after :func:`pcpp.convert`, so that it sees the gathered (full) output. The UNet batch is
    ``[unconditional x n, conditional x n]``; before each batch of images the sampler calls :meth:`begin_batch`
    with the prompt ids of the batch, and the hook keeps the rows of the ``wanted`` ids among them.

    Args:
        unet: the UNet.
        guidance: classifier-free guidance scale.
        first_step: first step (0-based, per image) to record.
    """

    def __init__(self, unet: nn.Module, guidance: float, first_step: int) -> None:
        self.guidance = guidance
        self.first_step = first_step
        self.wanted: frozenset[int] = frozenset()
        self._select = torch.zeros(0, dtype=torch.long)
        self._select_ids: list[int] = []
        self.calls: list[dict[str, Any]] = []
        self._signature = inspect.signature(unet.forward)
        self._step = 0
        self._last_t: float | None = None
        self._handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()

    def begin_batch(self, batch_ids: Sequence[int]) -> None:
        """Declare the prompt ids of the next batch of images (in batch order)."""
        positions = [k for k, i in enumerate(batch_ids) if i in self.wanted]
        self._select = torch.tensor(positions, dtype=torch.long)
        self._select_ids = [int(batch_ids[k]) for k in positions]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        timestep = arguments["timestep"]
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, Tensor) else float(timestep)
        if self._last_t is not None and t > self._last_t:
            self._step = 0  # a new image
        self._last_t = t
        step, self._step = self._step, self._step + 1
        if self._select.numel() == 0 or step < self.first_step:
            return
        sample: Tensor = arguments["sample"]
        batch = sample.shape[0]
        if batch % 2:
            raise ValueError(f"expected a CFG batch [uncond, cond], got batch {batch}")
        n = batch // 2
        rows = torch.cat([self._select, self._select + n]).to(sample.device)

        def take(x: Tensor) -> Tensor:
            return x.index_select(0, rows).detach().cpu() if x.ndim > 0 and x.shape[0] == batch else x.detach().cpu()

        out = _unet_output(output).index_select(0, rows).detach().float().cpu()
        uncond, cond = out.chunk(2)
        self.calls.append(
            {
                "step": step,
                "t": t,
                "arguments": map_tensors(arguments, take),
                "guided": uncond + self.guidance * (cond - uncond),
                "ids": list(self._select_ids),
            }
        )

    @torch.no_grad()
    def errors(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str) -> dict[int, dict[int, float]]:
        """Relative L2 error of the recorded guided eps against ``unet`` (unconverted) on the same inputs.

        Args:
            unet: the single-device UNet.
            alphas_cumprod: the scheduler's cumulative alphas.
            prediction_type: the scheduler's prediction type.

        Returns:
            ``{image id: {step: error}}``.
        """
        device = next(unet.parameters()).device
        result: dict[int, dict[int, float]] = {}
        for call in self.calls:
            arguments = map_tensors(call["arguments"], lambda x: x.to(device))
            out = _unet_output(unet(**arguments)).float().cpu()
            uncond, cond = out.chunk(2)
            guided_ref = uncond + self.guidance * (cond - uncond)
            x_t = call["arguments"]["sample"].float().chunk(2)[0]
            alpha_bar = float(alphas_cumprod[round(call["t"])])
            eps = to_eps(call["guided"], x_t, alpha_bar, prediction_type)
            eps_ref = to_eps(guided_ref, x_t, alpha_bar, prediction_type)
            for image_id, err in zip(call["ids"], relative_l2(eps, eps_ref).tolist(), strict=True):
                result.setdefault(int(image_id), {})[call["step"]] = float(err)
        return result
