"""Ranks agree, or the image stops: ranks given different inputs raise RanksDisagreeError on every rank."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import pcpp
from agreement_workers import Run, loops
from pcpp.agreement import tensor_checksum
from pcpp.testing import run_distributed

# Relative L2 error allowed between the exact parallel loop and the single-device loop: the bound of
# tests/test_parallel_unet.py (fp32 rounding in a different order, amplified by guidance; a wrong strip gives 1e-2).
EXACT_RTOL = 1e-4


class _Done:
    def wait(self) -> None:
        return None


class Peers:
    """A communicator of ``len(peers) + 1`` ranks in one process: this rank is ``rank``; the others' vectors were
    recorded earlier (by :class:`Recorder`)."""

    def __init__(self, rank: int, peers: dict[int, Tensor]) -> None:
        self._rank, self.peers = rank, peers

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self.peers) + 1

    def send_recv(self, messages: object, *, what: str) -> _Done:
        raise AssertionError("the check only gathers")

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> _Done:
        rows = [tensor if r == self._rank else self.peers[r] for r in range(self.world_size)]
        output.copy_(torch.cat(rows))
        return _Done()


class Recorder(Peers):
    """Plays rank ``rank`` of a group whose every rank sent the same vector; keeps it as ``vector``."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, {})
        self._world, self.vector = world_size, torch.empty(0)

    @property
    def world_size(self) -> int:
        return self._world

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> _Done:
        self.vector = tensor.clone()
        output.copy_(tensor.repeat(self._world))
        return _Done()


def _arguments(seed: int = 0, **changes: Any) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    arguments = {
        "sample": torch.randn(2, 4, 16, 12, generator=gen),
        "timestep": torch.tensor(981),
        "encoder_hidden_states": torch.randn(2, 5, 8, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 8, generator=gen),
            "time_ids": torch.randn(2, 8, generator=gen),
        },
        "down_block_additional_residuals": (
            torch.randn(2, 4, 16, 12, generator=gen),
            torch.randn(2, 4, 8, 6, generator=gen),
        ),
        "cross_attention_kwargs": {"scale": 1.0},
    }
    arguments.update(changes)
    return arguments


def _vector(arguments: dict[str, Any], config: pcpp.PCPPConfig, rank: int = 1) -> Tensor:
    recorder = Recorder(rank, 2)
    pcpp.check_ranks_agree(recorder, arguments, config, image=0, step=0)  # agrees with itself: no error
    return recorder.vector


def _disagreement(mine: dict[str, Any], theirs: dict[str, Any], config: pcpp.PCPPConfig | None = None) -> str:
    """The message rank 0 (``mine``) raises against rank 1 (``theirs``), or "" when they agree."""
    peer = _vector(theirs, config or pcpp.PCPPConfig())
    try:
        pcpp.check_ranks_agree(Peers(0, {1: peer}), mine, pcpp.PCPPConfig(), image=0, step=0)
    except pcpp.RanksDisagreeError as error:
        return str(error)
    return ""


def test_checksum_does_not_depend_on_layout() -> None:
    """Equal values give equal checksums whatever the strides: transposed, channels-last, expanded, sliced."""
    x = torch.randn(2, 4, 16, 12)
    same = [
        x.clone(),
        x.transpose(2, 3).contiguous().transpose(2, 3),
        x.to(memory_format=torch.channels_last),
    ]
    for y in same:
        assert not y.is_contiguous() or y is same[0]
        assert tensor_checksum(y) == tensor_checksum(x)
    row = torch.randn(1, 7)
    assert tensor_checksum(row.expand(3, 7)) == tensor_checksum(row.repeat(3, 1))
    assert tensor_checksum(x[:, :, ::2]) == tensor_checksum(x[:, :, ::2].clone())
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool):
        z = (x * 3).to(dtype)
        assert tensor_checksum(z.transpose(0, 1).contiguous().transpose(0, 1)) == tensor_checksum(z)


def test_checksum_sees_any_change_and_is_deterministic() -> None:
    """One ulp anywhere (either side of a chunk boundary), a swap, a sign of zero or another seed changes it; the
    same values give the same checksum whatever the thread count (integer sums do not depend on their order)."""
    x = torch.randn(3 * 2**19 + 5)  # 2**20 words per chunk: this spans three chunks
    base = tensor_checksum(x)
    for i in (0, 1, 2**19 - 1, 2**19, x.numel() - 1):
        y = x.clone()
        y[i] = torch.nextafter(y[i], torch.tensor(float("inf")))
        assert tensor_checksum(y) != base, i
    swapped = x.clone()
    swapped[[3, 2**19 + 7]] = x[[2**19 + 7, 3]]
    assert tensor_checksum(swapped) != base
    assert tensor_checksum(torch.tensor([0.0, 1.0])) != tensor_checksum(torch.tensor([-0.0, 1.0]))
    assert tensor_checksum(torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(1))) != tensor_checksum(
        torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(2))
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tensor_checksum(x)
        torch.set_num_threads(4)
        assert tensor_checksum(x) == one == base
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sample": torch.randn(2, 4, 16, 12)}, "latent checksum differs between rank 0 and rank 1"),
        ({"sample": _arguments()["sample"].half()}, "latent dtype differs (rank 0: float16, rank 1: float32)"),
        ({"timestep": torch.tensor(961)}, "timestep differs (rank 0: 961, rank 1: 981)"),
        ({"timestep": torch.tensor(981.0)}, "timestep differs between rank 0 and rank 1 (each shows 981"),
        ({"encoder_hidden_states": torch.randn(2, 5, 8)}, "encoder_hidden_states (the prompt embeddings) differs"),
        (
            {
                "added_cond_kwargs": {
                    "text_embeds": _arguments()["added_cond_kwargs"]["time_ids"],
                    "time_ids": _arguments()["added_cond_kwargs"]["text_embeds"],
                }
            },
            "added_cond_kwargs",
        ),
        (
            {"down_block_additional_residuals": _arguments()["down_block_additional_residuals"][::-1]},
            "the checksum of the other arguments",
        ),
        ({"cross_attention_kwargs": {"scale": 0.5}}, "the checksum of the other arguments"),
    ],
    ids=["latent", "dtype", "timestep", "timestep-dtype", "prompt", "added-swapped", "residuals-order", "lora-scale"],
)
def test_each_input_that_differs_is_named(change: dict[str, Any], expected: str) -> None:
    """Rank 0 changes one input from rank 1's; the message names it, and only it."""
    torch.manual_seed(5)
    message = _disagreement(_arguments(**change), _arguments())
    assert expected in message
    assert message.count("differs") == (2 if "dtype" in expected else 1), message  # a dtype changes the bits too
    assert _disagreement(_arguments(), _arguments()) == ""


def test_settings_and_groups_of_ranks_are_named() -> None:
    """A PCPPConfig field is shown per rank; with three ranks, those that agree are grouped."""
    message = _disagreement(_arguments(), _arguments(), pcpp.PCPPConfig(warmup_steps=2))
    assert "PCPPConfig.warmup_steps differs (rank 0: 4, rank 1: 2)" in message
    config = pcpp.PCPPConfig()
    peers = {1: _vector(_arguments(seed=1), config, rank=1), 2: _vector(_arguments(), config, rank=2)}
    with pytest.raises(pcpp.RanksDisagreeError, match="between ranks 0, 2 and rank 1"):
        pcpp.check_ranks_agree(Peers(0, peers), _arguments(), config, image=0, step=0)


def test_one_rank_is_a_no_op() -> None:
    """A group of one compares nothing and communicates nothing."""
    pcpp.check_ranks_agree(pcpp.comm.LocalCommunicator(), _arguments(), pcpp.PCPPConfig(), image=0, step=0)
    pcpp.check_ranks_agree(Peers(0, {}), _arguments(), pcpp.PCPPConfig(), image=0, step=0)


# Each rank moves one setting by its rank (rank r: seed + r, height + 8r, steps + r, ...); the expected text of
# the message on every rank, with rank 0's and rank 1's values where the message shows them.
DIFFERENT = [
    (Run(per_rank="seed"), "step 0): latent checksum differs between rank 0"),
    (Run(per_rank="prompt"), "step 0): encoder_hidden_states (the prompt embeddings) differs between rank 0"),
    (Run(per_rank="height"), "step 0): latent shape differs (rank 0: 2x4x16x12, rank 1: 2x4x24x12"),
    (Run(per_rank="steps"), "step 0): timestep differs (rank 0: 667, rank 1: 751"),  # "leading": 3 vs 4 steps
    (Run(per_rank="steps", spacing="trailing"), "step 1): timestep differs (rank 0: 666, rank 1: 749"),  # 999 first
    (Run(family="sdxl", per_rank="text_embeds"), "step 0): added_cond_kwargs"),
]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_given_different_inputs_all_raise_and_equal_inputs_stay_exact(world: int) -> None:
    """Different seeds, prompts, heights, step counts or added conditions raise RanksDisagreeError on every rank,
    naming what differs (uneven strips on 3 ranks); equal inputs give the single-device result, with and without
    the CFG split (every rank of the CFG group receives the full batch)."""
    runs = [run for run, _ in DIFFERENT] + [Run()]
    if world == 2:
        runs += [Run(cfg_split=True, per_rank="prompt"), Run(cfg_split=True)]
    reports = run_distributed(loops, world, runs, timeout=600)
    for rank, report in enumerate(reports):
        for (run, expected), result in zip(DIFFERENT, report, strict=False):
            assert result["error"] == "RanksDisagreeError", (rank, run, result)
            assert expected in result["message"], (rank, run, result["message"])
        for run, result in zip(runs[len(DIFFERENT) :], report[len(DIFFERENT) :], strict=True):
            if run.per_rank is not None:
                assert result["error"] == "RanksDisagreeError", (rank, run, result)
                assert "encoder_hidden_states" in result["message"], (rank, run, result["message"])
                continue
            assert result["error"] is None, (rank, run, result)
            error = ((result["out"] - result["reference"]).norm() / result["reference"].norm()).item()
            assert error < EXACT_RTOL, (rank, run, error)
            assert torch.equal(result["out"], reports[0][runs.index(run)]["out"])  # every rank returns the same
