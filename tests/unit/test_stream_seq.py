"""bus.stream_seq reads a delivered message's stream sequence from its reply subject, as
nats-py's full metadata parse does (a real nats-server's consumers, pull and push)."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared import bus


async def test_stream_seq_agrees_with_the_metadata(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(name="SEQTEST", subjects=["seqtest.>"])
    try:
        for i in range(5):
            await js.publish("seqtest.a" if i % 2 else "seqtest.b", str(i).encode())
        pull = await js.pull_subscribe("seqtest.a", durable="seq-pull")
        pulled = await pull.fetch(2, timeout=5)
        got: asyncio.Queue[Msg] = asyncio.Queue()
        await js.subscribe("seqtest.>", cb=got.put, ordered_consumer=True)
        pushed = [await asyncio.wait_for(got.get(), 5) for _ in range(5)]
        for msg in pulled + pushed:
            assert bus.stream_seq(msg) == msg.metadata.sequence.stream
        assert [bus.stream_seq(m) for m in pulled] == [2, 4]
        assert [bus.stream_seq(m) for m in pushed] == [1, 2, 3, 4, 5]
        # A message that is not a JetStream delivery has no sequence to read.
        plain = Msg(nc, subject="x", reply="_INBOX.abc", data=b"")
        with pytest.raises(nats.errors.NotJSMessageError):
            bus.stream_seq(plain)
    finally:
        await js.delete_stream("SEQTEST")
