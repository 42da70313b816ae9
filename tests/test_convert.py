"""In-process tests of the converter and its guards: no process group needed (LocalCommunicator, fake groups)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

import pcpp
from pcpp.comm import LocalCommunicator, ParallelGroups
from pcpp.layers import AsyncGroupNorm, PartialPatchAttention, PartialPatchConv2d
from pcpp.testing import tiny_unet_config


class _Done:
    def wait(self) -> None:
        return None


class FakeComm:
    """A communicator that claims ``world_size`` ranks and fails loudly if asked to communicate."""

    def __init__(self, world_size: int, rank: int = 0) -> None:
        self._world_size, self._rank = world_size, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def send_recv(self, messages: object, *, what: str) -> _Done:
        raise AssertionError("FakeComm cannot communicate")

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> _Done:
        raise AssertionError("FakeComm cannot communicate")


def _unet(family: str = "tiny") -> UNet2DConditionModel | UNet2DModel:
    torch.manual_seed(0)
    config = tiny_unet_config(family)
    return (UNet2DModel(**config) if family == "unet2d" else UNet2DConditionModel(**config)).eval()


def _snapshot(unet: nn.Module) -> tuple[list[tuple[str, int]], int, int]:
    return (
        [(n, id(m)) for n, m in unet.named_modules()],
        len(unet._forward_pre_hooks),
        len(unet._forward_hooks),
    )


def _call(unet: nn.Module, height: int = 16, width: int = 12) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, height, width, generator=gen)
    ehs = torch.randn(2, 5, 8, generator=gen)
    with torch.no_grad():
        return unet(x, 10, ehs).sample


@pytest.mark.parametrize("family", ["tiny", "sd15", "sdxl", "unet2d"])
def test_convert_replaces_every_row_mixing_module_and_keeps_state_dict_keys(family: str) -> None:
    """Every k>1 or strided conv, GroupNorm and self-attention is replaced; cross-attention is not; keys stay."""
    unet = _unet(family)
    keys = list(unet.state_dict())
    params = {n: p.data_ptr() for n, p in unet.named_parameters()}
    convs = sum(isinstance(m, nn.Conv2d) and (m.kernel_size[0] > 1 or m.stride[0] > 1) for m in unet.modules())
    norms = sum(isinstance(m, nn.GroupNorm) for m in unet.modules())
    assert pcpp.convert(unet, comm=LocalCommunicator()) is unet
    assert pcpp.is_converted(unet)
    assert list(unet.state_dict()) == keys
    assert {n: p.data_ptr() for n, p in unet.named_parameters()} == params  # parameters are shared, not copied
    assert sum(isinstance(m, PartialPatchConv2d) for m in unet.modules()) in (convs, convs + 1)  # + a 1x1 conv_in
    assert sum(isinstance(m, AsyncGroupNorm) for m in unet.modules()) == norms
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            assert not isinstance(module, PartialPatchAttention)
        if name.endswith("attn1"):
            assert isinstance(module, PartialPatchAttention)
    assert isinstance(unet.conv_in, PartialPatchConv2d)
    assert unet.conv_in.entry


def test_one_rank_local_communicator_is_bitwise_identical_and_revert_restores() -> None:
    unet = _unet("sdxl")
    originals = [(n, id(m)) for n, m in unet.named_modules()]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 12, generator=gen)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=gen),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 8, generator=gen), "time_ids": torch.randn(2, 6)},
    }
    with torch.no_grad():
        ref = unet(x, 10, **kwargs).sample
        pcpp.convert(unet, comm=LocalCommunicator(), warmup_steps=1)
        outs = [unet(x, 10, **kwargs).sample for _ in range(3)]
    assert all(torch.equal(o, ref) for o in outs)
    assert pcpp.revert(unet) is unet
    assert not pcpp.is_converted(unet)
    assert [(n, id(m)) for n, m in unet.named_modules()] == originals
    assert not unet._forward_pre_hooks
    assert not unet._forward_hooks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"partial": 1.5}, r"partial=1\.5 is outside \[0, 1\]"),
        ({"partial": -0.1}, r"partial=-0\.1 is outside"),
        ({"partial": float("nan")}, r"partial=nan"),
        ({"partial": "0.3"}, r"partial='0\.3' must be a number"),
        ({"warmup_steps": -1}, r"warmup_steps=-1 is negative"),
        ({"warmup_steps": 2.5}, r"warmup_steps=2\.5 must be an int"),
        ({"conditioning": "full"}, r"conditioning='full' must be a pcpp\.Conditioning member"),
        ({"timeout": 5}, r"timeout=5 must be a positive datetime\.timedelta"),
        ({"timeout": timedelta(0)}, r"must be a positive"),
        ({"comm": object()}, r"is not a process group, a DeviceMesh, a pcpp communicator"),
        ({"comm": None}, r"torch\.distributed is not initialised"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(kwargs: dict, match: str) -> None:
    unet = _unet()
    before = _snapshot(unet)
    with pytest.raises(pcpp.ConversionError, match=match):
        pcpp.convert(unet, **({"comm": LocalCommunicator()} | kwargs))
    assert _snapshot(unet) == before
    assert not pcpp.is_converted(unet)


def test_parallel_groups_checks_its_cfg_group() -> None:
    with pytest.raises(pcpp.ConversionError, match="CFG group has 3 ranks"):
        ParallelGroups(patch=LocalCommunicator(), cfg=FakeComm(3))
    with pytest.raises(pcpp.ConversionError, match="is not a pcpp communicator"):
        ParallelGroups(patch=object())  # type: ignore[arg-type]


def test_non_unet_models_and_double_conversion_are_refused() -> None:
    for model in (nn.Linear(2, 2), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))):
        with pytest.raises(pcpp.ConversionError, match=r"expects a diffusers UNet .* got (Linear|Sequential)"):
            pcpp.convert(model, comm=LocalCommunicator())
    unet = pcpp.convert(_unet(), comm=LocalCommunicator())
    before = _snapshot(unet)
    with pytest.raises(pcpp.ConversionError, match="already converted"):
        pcpp.convert(unet, comm=LocalCommunicator())
    assert _snapshot(unet) == before
    with pytest.raises(pcpp.ConversionError, match="is not converted"):
        pcpp.revert(_unet())


def test_unknown_row_mixing_modules_are_named_and_nothing_changes() -> None:
    unet = _unet()
    unet.up_blocks[0].upsamplers[0].conv = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1)
    unet.down_blocks[0].resnets[0].extra_norm = nn.BatchNorm2d(8)
    unet.mid_block.resnets[0].conv1.padding_mode = "reflect"
    before = _snapshot(unet)
    with pytest.raises(pcpp.UnsupportedModuleError) as info:
        pcpp.convert(unet, comm=LocalCommunicator())
    message = str(info.value)
    assert "3 module(s)" in message
    assert "up_blocks.0.upsamplers.0.conv (ConvTranspose2d)" in message
    assert "down_blocks.0.resnets.0.extra_norm (BatchNorm2d)" in message
    assert "mid_block.resnets.0.conv1 (Conv2d): padding_mode='reflect'" in message
    assert _snapshot(unet) == before


def test_custom_attention_processor_is_refused() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    unet = _unet()
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(Custom())
    with pytest.raises(pcpp.UnsupportedModuleError, match=r"attn1 uses attention processor Custom"):
        pcpp.convert(unet, comm=LocalCommunicator())


def test_fused_processor_without_fused_projection_is_refused() -> None:
    """FusedAttnProcessor2_0 reads ``to_qkv``, which only ``fuse_qkv_projections()`` builds: say so, change nothing."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    unet = _unet()
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(FusedAttnProcessor2_0())
    before = _snapshot(unet)
    with pytest.raises(pcpp.UnsupportedModuleError, match=r"attn1 uses FusedAttnProcessor2_0 but has no fused to_qkv"):
        pcpp.convert(unet, comm=LocalCommunicator())
    assert _snapshot(unet) == before


def test_fused_projections_are_converted_and_shared() -> None:
    """After ``fuse_qkv_projections()`` the converted self-attention keeps diffusers' fused processor and shares
    the very ``to_qkv`` module; on one rank the output is bitwise the plain fused UNet's."""
    unet = _unet()
    unet.fuse_qkv_projections()
    ref = _call(unet)
    to_qkv = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_qkv
    pcpp.convert(unet, comm=LocalCommunicator())
    attn1 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn1, PartialPatchAttention)
    assert attn1.to_qkv is to_qkv
    assert torch.equal(_call(unet), ref)


@pytest.mark.parametrize(("height", "smallest"), [(4, 6), (7, 8), (3, 6)])
def test_impossible_split_names_the_smallest_height(height: int, smallest: int) -> None:
    """The tiny UNet downsamples once (strips are multiples of 2 rows); 3 ranks need at least 6 rows."""
    unet = pcpp.convert(_unet(), comm=FakeComm(3))
    with pytest.raises(pcpp.SplitError, match=rf"cannot split a latent of height {height} into 3 strips.*{smallest}"):
        _call(unet, height=height)


def test_configure_validates_and_starts_a_new_image() -> None:
    unet = pcpp.convert(_unet(), comm=LocalCommunicator(), partial=0.3)
    _call(unet)
    ctx = pcpp.get_context(unet)
    assert (ctx.image, ctx.step) == (0, 1)
    with pytest.raises(pcpp.ConversionError, match="partial=2"):
        pcpp.configure(unet, partial=2)
    with pytest.raises(pcpp.ConversionError, match=r"unknown setting\(s\) \['partil'\]"):
        pcpp.configure(unet, partil=0.5)
    assert ctx.config.partial == 0.3
    config = pcpp.configure(unet, partial=0.5, warmup_steps=2)
    assert ctx.config is config
    assert config.partial == 0.5
    _call(unet)
    assert (ctx.image, ctx.step) == (1, 1)


def test_reset_and_timestep_detection_start_new_images() -> None:
    unet = pcpp.convert(_unet(), comm=LocalCommunicator())
    ctx = pcpp.get_context(unet)
    gen = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 16, 12, generator=gen), torch.randn(2, 5, 8, generator=gen)
    with torch.no_grad():
        for t in (900, 800, 800, 700):
            unet(x, t, ehs)
        assert (ctx.image, ctx.step) == (0, 4)
        unet(x, 950, ehs)  # the timestep went up: a new image
        assert (ctx.image, ctx.step) == (1, 1)
        pcpp.reset(unet)
        unet(x, 10, ehs)
        assert (ctx.image, ctx.step) == (2, 1)
    pcpp.configure(unet, detect_new_image=False)
    with torch.no_grad():
        unet(x, 5, ehs)
        unet(x, 999, ehs)
    assert (ctx.image, ctx.step) == (3, 2)


def test_phases_follow_warmup_steps() -> None:
    """warmup_steps counts synchronous steps; the first step is always synchronous; exact is always synchronous."""
    assert [pcpp.PCPPConfig(warmup_steps=3).phase_of(s).value for s in range(5)] == ["sync"] * 3 + ["async"] * 2
    assert pcpp.PCPPConfig(warmup_steps=0).phase_of(0) is pcpp.Phase.SYNC
    assert pcpp.PCPPConfig(warmup_steps=0).phase_of(1) is pcpp.Phase.ASYNC
    assert all(pcpp.PCPPConfig(exact=True).phase_of(s) is pcpp.Phase.SYNC for s in range(100))


def test_layers_outside_a_step_explain_what_to_do() -> None:
    ctx = pcpp.PatchContext(pcpp.PCPPConfig(warmup_steps=1), FakeComm(2), unit=1, levels=0)
    conv = PartialPatchConv2d(2, 2, 3, padding=1, context=ctx)
    with pytest.raises(pcpp.PCPPError, match="before its context knew the latent's size"):
        conv(torch.zeros(1, 2, 4, 4))
    ctx.begin_step(8, 4, None)
    ctx.end_step()  # step 1 is asynchronous, but this layer holds nothing from step 0
    with pytest.raises(pcpp.PCPPError, match=r"previous-step activations are from \(image, step\)=None"):
        conv(torch.zeros(1, 2, 4, 4))


def test_upcoming_phase_predicts_begin_step_without_changing_state() -> None:
    """What the CUDA-graph runner asks before picking a graph: the phase begin_step would open, read-only."""
    ctx = pcpp.PatchContext(pcpp.PCPPConfig(warmup_steps=2), LocalCommunicator(), unit=1, levels=0)
    seen = []
    for t in (900.0, 800.0, 700.0, 950.0):
        state = (ctx.image, ctx.step, ctx.phase, ctx.geometry, ctx.clock.new_image_due)
        predicted = ctx.upcoming_phase(8, 8, t)
        # Asked about other sizes and timesteps too: none of it may change what the next step does.
        ctx.upcoming_phase(16, 8, t + 1000.0)
        assert (ctx.image, ctx.step, ctx.phase, ctx.geometry, ctx.clock.new_image_due) == state  # nothing changed
        ctx.begin_step(8, 8, t)
        assert ctx.phase is predicted
        seen.append((ctx.image, ctx.step, predicted.value))
        ctx.end_step()
    assert seen == [(0, 0, "sync"), (0, 1, "sync"), (0, 2, "async"), (1, 0, "sync")]
    assert ctx.upcoming_phase(16, 8, None) is pcpp.Phase.SYNC  # a new size starts a new image
    assert ctx.upcoming_phase(8, 8, None) is pcpp.Phase.SYNC  # step 1 of image 1, still warmup
