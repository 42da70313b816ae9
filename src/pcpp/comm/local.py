"""A communicator for one rank: no peers, nothing to send."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..errors import PCPPError
from .base import DONE, Handle, Message

__all__ = ["LocalCommunicator"]


class LocalCommunicator:
    """The group of one rank. Converting with it leaves the UNet's results bitwise unchanged.

    Example:
        >>> import pcpp
        >>> comm = pcpp.comm.LocalCommunicator()
        >>> comm.world_size
        1
    """

    @property
    def rank(self) -> int:
        """Always 0."""
        return 0

    @property
    def world_size(self) -> int:
        """Always 1."""
        return 1

    def send_recv(self, messages: Sequence[Message], *, what: str) -> Handle:
        """Nothing to send or receive: there are no peers.

        Raises:
            PCPPError: a message was passed, which means a caller believes there is a peer.
        """
        if messages:
            raise PCPPError(f"{what}: a single-rank group has no peers to send to or receive from.")
        return DONE

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> Handle:
        """Copy ``tensor`` into ``output``."""
        output.copy_(tensor.reshape(output.shape))
        return DONE

    def __repr__(self) -> str:
        return "LocalCommunicator()"
