"""How many pixels of images one ingress replica works on at once.

Each request in flight holds its image decoded, sends it to both model replicas and encodes a
mask of the same size back: at the 40 Mpx limit, well over 100 MB. `max_ongoing_requests` of
those at once could exhaust a small node, while as many small images cost almost nothing. So
requests take their image's pixel count from a budget before decoding and give it back with
the response; a request that cannot get its share within `wait_s` is answered 503 with
`Retry-After`, like a full model queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from serving.inputs import ApiError


class PixelBudget:
    """A counting budget of pixels shared by the requests of one event loop."""

    def __init__(self, total: int, wait_s: float) -> None:
        if total < 1 or wait_s <= 0:
            raise ValueError(f"a pixel budget needs total >= 1 and wait_s > 0, got {total}, "
                             f"{wait_s}")
        self.total = total
        self.free = total
        self.wait_s = wait_s
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` (at most the whole budget) for the body of the `async with`."""
        n = max(0, min(int(pixels), self.total))
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.free >= n), self.wait_s)
            except asyncio.TimeoutError:
                raise ApiError(
                    503, "overloaded",
                    f"the server is busy with {self.total - self.free} of its {self.total} "
                    f"pixels in flight and this image needs {n}; retry later",
                    headers={"Retry-After": "1"}) from None
            self.free -= n
        try:
            yield
        finally:
            # given back before any await: a cancellation while waiting for the lock below
            # (a client gone mid-release) must not lose these pixels for good
            self.free += n
            await asyncio.shield(self._notify())

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()
