"""Faults are named: a peer killed or stopped mid-image gives every other rank a pcpp error within the timeout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dist_workers import Case
from fault_workers import stricken_loop, timeout_of
from pcpp.testing import run_distributed

TIMEOUT_S = 4.0
# Waits are bounded by the timeout; the margin covers a rank that first waits on a peer which is itself waiting
# on the victim (it fails one timeout later, or at once when that peer gives up and closes its connections).
MARGIN_S = TIMEOUT_S + 6.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("world", "victim", "sig", "at_step", "expected"),
    [
        # A killed peer closes its connections: the others learn at once, and must not be told of a timeout.
        (2, 1, "SIGKILL", 3, {"PeerFailedError"}),
        (3, 2, "SIGKILL", 1, {"PeerFailedError", "PeerTimeoutError"}),
        # A stopped peer answers nothing: the others wait for exactly the timeout.
        (2, 0, "SIGSTOP", 3, {"PeerTimeoutError"}),
        (3, 1, "SIGSTOP", 3, {"PeerFailedError", "PeerTimeoutError"}),
    ],
)
def test_a_lost_peer_is_named_within_the_timeout(
    tmp_path: Path, world: int, victim: int, sig: str, at_step: int, expected: set[str]
) -> None:
    case = Case(height=16 if world == 2 else 24, steps=6, convert=timeout_of(TIMEOUT_S))
    results = run_distributed(
        stricken_loop, world, case, victim, sig, at_step, str(tmp_path), timeout=120, expect_exit=[victim]
    )
    for rank, result in enumerate(results):
        if rank == victim:
            continue
        assert result["type"] in expected, (rank, result)
        assert f"step {at_step}" in result["message"], result["message"]  # the step it failed in is named
        assert "peer rank" in result["message"], result["message"]  # and the peer(s) it waited for
        assert result["seconds"] < TIMEOUT_S + MARGIN_S, result
        if result["type"] == "PeerTimeoutError":
            assert result["seconds"] >= 0.9 * TIMEOUT_S, result  # "did not answer within N s" only after N s
            assert f"within {TIMEOUT_S:g} s" in result["message"]
    for pid_file in tmp_path.glob("rank*.pid"):
        assert not _alive(int(pid_file.read_text())), f"{pid_file.stem} was left running"
