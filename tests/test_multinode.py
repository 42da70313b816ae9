"""Several machines, on one: two torchrun agents (``--nnodes 2``, one process each) meet through a c10d rendezvous
on 127.0.0.1 and run ``pcpp generate`` over gloo; the image must equal the single-agent ``--nproc-per-node 2`` run.

Both runs form the same 2-rank patch group with the same settings, so the arithmetic is the same: the PNGs must be
equal pixel for pixel. (Which agent becomes rank 0 is the rendezvous's choice, c10d ignores ``--node-rank``; the
image does not depend on it, and whichever is rank 0 writes ``--out``.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from commands import command_env, free_port, pixels

GENERATE = ["-m", "pcpp", "generate", "--prompt", "a red circle on a blue background", "--seed", "7"]
GENERATE += ["--height", "32", "--width", "32", "--steps", "5", "--no-reference"]


@pytest.mark.slow
def test_two_torchrun_agents_over_loopback_equal_one_agent(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    single = tmp_path / "single.png"
    one_agent = [*torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    subprocess.run(
        [*one_agent, *GENERATE, "--out", str(single)], env=command_env(), check=True, capture_output=True, timeout=300
    )

    multi = tmp_path / "two-agents.png"
    port = free_port()
    agents: list[subprocess.Popen[bytes]] = []
    for node in (0, 1):
        command = [*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pcpp-test", "--local-addr", "127.0.0.1"]
        # Both agents run on this machine: say which one hosts the rendezvous store instead of letting c10d guess.
        command += ["--rdzv-conf", f"is_host={int(node == 0)}"]
        log = (tmp_path / f"agent{node}.log").open("w")
        agents.append(
            subprocess.Popen(
                [*command, *GENERATE, "--out", str(multi)], env=command_env(), stdout=log, stderr=subprocess.STDOUT
            )
        )
    try:
        codes = [agent.wait(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    logs = "\n".join((tmp_path / f"agent{node}.log").read_text() for node in (0, 1))
    assert codes == [0, 0], logs
    assert "2 process(es)" in logs
    np.testing.assert_array_equal(pixels(multi), pixels(single))
