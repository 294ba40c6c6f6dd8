"""A request's outputs as its consumer reads them (command_loop.outputs_of): what queued up
while it was busy comes as one output, nothing lost, nothing reordered, an error raised after
the tokens before it."""

from __future__ import annotations

import asyncio

import pytest

from dormant.engines.base import RequestOutput, TokenLogprob
from dormant.engines.command_loop import outputs_of


def _read(items: list) -> tuple[list[RequestOutput], BaseException | None]:
    async def go():
        out: asyncio.Queue = asyncio.Queue()
        for item in items:
            out.put_nowait(item)
        got = []
        try:
            async for output in outputs_of(out):
                got.append(output)
        except RuntimeError as e:
            return got, e
        return got, None

    return asyncio.run(go())


@pytest.mark.timeout(10)
def test_outputs_queued_while_the_consumer_was_busy_come_as_one():
    lp = [TokenLogprob(t, -0.5 * t) for t in (3, 4, 5)]
    got, error = _read([RequestOutput([3], logprobs=lp[:1], prompt_logprobs=[None, lp[0]]),
                        RequestOutput([4], logprobs=lp[1:2]),
                        RequestOutput([5], True, "length", logprobs=lp[2:])])
    assert error is None and len(got) == 1
    (one,) = got
    assert one.new_token_ids == [3, 4, 5] and one.logprobs == lp
    assert (one.finished, one.finish_reason, one.prompt_logprobs) == (True, "length", [None, lp[0]])


@pytest.mark.timeout(10)
def test_an_error_is_raised_after_the_tokens_queued_before_it():
    got, error = _read([RequestOutput([1]), RequestOutput([2]), RuntimeError("step failed"), RequestOutput([9])])
    assert [o.new_token_ids for o in got] == [[1, 2]] and str(error) == "step failed"


@pytest.mark.timeout(10)
def test_the_finished_output_ends_the_stream_and_outputs_without_logprobs_keep_none():
    got, error = _read([RequestOutput([1]), RequestOutput([2], True, "stop"), RequestOutput([7])])
    assert error is None and [(o.new_token_ids, o.finish_reason, o.logprobs) for o in got] == [([1, 2], "stop", None)]


@pytest.mark.timeout(10)
def test_a_consumer_that_keeps_up_gets_each_output_as_it_came():
    async def go():
        out: asyncio.Queue = asyncio.Queue()
        got = []

        async def consume():
            async for output in outputs_of(out):
                got.append(output.new_token_ids)

        task = asyncio.create_task(consume())
        for i in range(3):
            out.put_nowait(RequestOutput([i], finished=i == 2))
            while len(got) < i + 1 and not task.done():
                await asyncio.sleep(0)
        await task
        return got

    assert asyncio.run(go()) == [[0], [1], [2]]
