"""Where each stored Responses API response lives: response id -> (tier, upstream address).

Strategy: vLLM keeps the responses it created in its own process (`store`), so `GET
/v1/responses/{id}`, `POST /v1/responses/{id}/cancel` and a create whose `previous_response_id` names
one must reach the server that created it. The relay's usage tap reads the id as it passes (the
Response object's first member; the stream's `response.created` event) and the exchange's end
records it here (`remember`); the routes look it up (`home`). An in-process LRU bounded in entries
and age: one dict, O(1) both ways, nothing on the hot path of other endpoints. Ids come from the
upstream, never from a client, so a client cannot fill it; a client only looks up.
Scope: one gateway process; under the supervisor the workers share one table instead
(shared_homes.py, same interface). A gateway restart forgets: a retrieve is then 404 (the upstream
may still hold it). With `[cluster]` the map is the cluster's, in Redis (redis_homes.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_ENTRIES = 100_000
MAX_AGE_S = 24 * 3600.0


class ResponseHomes:
    __slots__ = ("_clock", "_map", "max_age_s", "max_entries")

    def __init__(self, *, max_entries: int = MAX_ENTRIES, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._map: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._map)

    def remember(self, response_id: str, tier: str, upstream: str) -> None:
        """`response_id` was created by `upstream` ("host:port") of `tier`."""
        m = self._map
        m[response_id] = (tier, upstream, self._clock())
        m.move_to_end(response_id)
        while len(m) > self.max_entries:
            m.popitem(last=False)

    def fetch_command(self, response_id: str) -> tuple | None:
        """None: this map is the only one, nothing to fetch from elsewhere (redis_homes.py has one)."""
        return None

    async def lookup(self, response_id: str) -> tuple[str, str] | None:
        """`home`, awaitable: the request path's one call, whichever map serves (redis_homes.py)."""
        return self.home(response_id)

    def home(self, response_id: str) -> tuple[str, str] | None:
        """(tier name, upstream "host:port") that holds `response_id`, or None (unknown or expired)."""
        entry = self._map.get(response_id)
        if entry is None:
            return None
        tier, upstream, at = entry
        if self._clock() - at > self.max_age_s:
            del self._map[response_id]
            return None
        return tier, upstream
