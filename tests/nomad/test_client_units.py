"""Client behaviour that needs no Nomad: durations, log frames, unreachable addresses."""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest

from nomad_pipeline.errors import Invalid, NomadUnavailable
from nomad_pipeline.nomad.client import NomadClient, _FrameDecoder, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("5m", 300.0), ("1m30s", 90.0), ("250ms", 0.25), ("1h", 3600.0)],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "", "5 m", "1x", "s"])
def test_bad_durations_are_invalid(text: str) -> None:
    with pytest.raises(Invalid, match="invalid duration"):
        parse_duration(text)


def _frame(data: bytes, offset: int) -> bytes:
    return json.dumps(
        {"Offset": offset, "Data": base64.b64encode(data).decode(), "File": "alloc/logs/t.0"},
        separators=(",", ":"),
    ).encode()


def test_frames_split_anywhere_decode_to_the_logged_bytes() -> None:
    payload = "héllo wörld\n".encode() * 3
    stream = (
        b"{}"
        + _frame(payload[:10], 10)
        + b'{"Offset":10,"File":"alloc/logs/t.0","FileEvent":"file truncated"}'
        + b"{}"
        + _frame(payload[10:], len(payload))
    )
    # Feed one byte at a time: frames and UTF-8 sequences are cut at every possible point.
    decoder = _FrameDecoder()
    out = b"".join(b"".join(decoder.feed(stream[i : i + 1])) for i in range(len(stream)))

    assert out == payload


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_nomad_is_unavailable_after_bounded_retries() -> None:
    address = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    async with NomadClient(address) as client:
        with pytest.raises(NomadUnavailable, match="unreachable"):
            await client.status_leader()
        with pytest.raises(NomadUnavailable):
            await client.put_variable("x", {"a": "b"})
    assert time.monotonic() - started < 10


async def test_streams_from_an_unreachable_nomad_are_unavailable() -> None:
    async with NomadClient(f"http://127.0.0.1:{_closed_port()}") as client:
        with pytest.raises(NomadUnavailable):
            await anext(client.event_stream(["Job"]))


def test_an_address_that_is_not_a_url_is_invalid() -> None:
    with pytest.raises(Invalid, match="must be an http"):
        NomadClient("127.0.0.1:4646")
