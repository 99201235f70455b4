"""LiveRequest: each committed token streamed once, in order; regenerated tokens counted, not repeated."""
import asyncio

import pytest

from spotserve.live.requests import LiveRequest


def test_stream_sees_every_token_once_across_a_restart_from_scratch():
    async def go():
        lr = LiveRequest(1, [1, 2], {"max_new_tokens": 4})
        seen = []

        async def reader():
            async for t in lr.stream():
                seen.append(t)
        task = asyncio.ensure_future(reader())
        assert lr.accept(0, 5) and lr.accept(1, 6)
        await asyncio.sleep(0)
        # a baseline restarts the request from scratch: tokens 0 and 1 come again
        assert not lr.accept(0, 5) and not lr.accept(1, 9)
        assert lr.accept(2, 7) and lr.accept(3, 8)
        await asyncio.wait_for(task, 1)
        assert seen == [5, 6, 7, 8] and lr.done
        assert (lr.recomputed, lr.mismatches) == (2, 1)
        with pytest.raises(ValueError, match="after 4 committed"):
            lr.accept(5, 1)
    asyncio.run(go())
