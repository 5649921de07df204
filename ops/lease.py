"""Who may change a tier's instances: the wake lease, and spot notices every gateway host acts on.

Strategy: with several gateway hosts (or workers) each tier has several wakers, and "one wake per
tier" means exactly one of them sends StartInstances. The waker asks its `TierLink` before every EC2
call that changes instances -- start, launch, stop, terminate -- (`hold`: take the lease, or renew it
if this waker holds it; False means another node holds it, so this waker only watches: it describes,
probes and serves when the tier is ready, like any other waiting host) and gives it back when the wake
or the stop is over (`release`). A lease expires on its own (`[cluster] lease_s`), so a host that dies
mid-wake blocks the next one for at most that long; the next holder starts only what EC2 still shows
stopped. A spot notice arrives at one host (SQS hands a message to one reader): the waker that gets it
`share`s it, and every waker reads the tier's shared notices at each poll (`notices`) and takes the
host out of rotation as if it had read the message itself.
This module is the contract and the single-host link (`LocalLink`: always the holder, nothing shared);
the cluster's link lives in proxy/cluster/lease.py (Redis), handed to the waker by the gateway.
"""

from __future__ import annotations

from typing import Protocol


class TierLink(Protocol):
    async def hold(self) -> bool:
        """Take or renew this tier's lease; True when this waker holds it now."""
        ...

    async def release(self) -> None:
        """Give the lease back (if held)."""
        ...

    def share(self, instance_id: str, kind: str, hold_s: float) -> None:
        """Tell the other hosts about a spot notice (queued; never blocks)."""
        ...

    async def notices(self, instance_ids: list[str]) -> dict[str, str]:
        """The shared notices in force for `instance_ids`: instance id -> kind."""
        ...


class LocalLink:
    """One gateway process: the lease is always ours; notices are not shared."""

    async def hold(self) -> bool:
        return True

    async def release(self) -> None:
        return None

    def share(self, instance_id: str, kind: str, hold_s: float) -> None:
        return None

    async def notices(self, instance_ids: list[str]) -> dict[str, str]:
        return {}


LOCAL = LocalLink()
