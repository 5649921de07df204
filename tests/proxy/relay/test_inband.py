"""inband_error and end_stream_with_error (proxy/relay/inband.py): a failed stream's last bytes.

The event is compared byte for byte; end_stream_with_error writes to a real Downstream on a socket
pair (tests/support/upstream_kit.client_side) and the client's end is read to EOF.
"""

from __future__ import annotations

import trio

from proxy import errors
from proxy.relay.inband import end_stream_with_error, inband_error
from tests.support.upstream_kit import client_side, new_gateway, received


def test_inband_error_is_one_sse_data_event_in_the_openai_envelope():
    assert inband_error("Tier 'big' timed out.", "wake_timeout") == (
        b'data: {"error":{"message":"Tier \'big\' timed out.","type":"server_error","param":null,'
        b'"code":"wake_timeout"}}\n\n')


def test_inband_error_escapes_the_message_as_json():
    assert inband_error('say "hi"\n\u00e9', "x") == (
        b'data: {"error":{"message":"say \\"hi\\"\\n\xc3\xa9","type":"server_error","param":null,"code":"x"}}\n\n')


async def test_end_stream_with_error_sends_one_chunk_and_no_last_chunk():
    gw = new_gateway(["http://127.0.0.1:9"])
    ds, peer = client_side(gw)
    head = ds.response_head(200, [(b"content-type", b"text/event-stream")], None)
    with trio.fail_after(5):
        await ds.send_raw(head)
        await end_stream_with_error(ds, errors.upstream_timeout("big", "no data"))
    event = inband_error("The upstream of tier 'big' timed out (no data).", "upstream_timeout")
    assert ds.client_gone
    assert await received(ds, peer) == head + b"%x\r\n%s\r\n" % (len(event), event)


async def test_an_error_without_a_code_uses_its_type():
    gw = new_gateway(["http://127.0.0.1:9"])
    ds, peer = client_side(gw)
    ds.response_head(200, [], None)
    with trio.fail_after(5):
        await end_stream_with_error(ds, errors.ApiError(500, "boom", "server_error"))
    event = b'data: {"error":{"message":"boom","type":"server_error","param":null,"code":"server_error"}}\n\n'
    assert await received(ds, peer) == b"%x\r\n%s\r\n" % (len(event), event)


async def test_a_client_already_gone_is_not_an_error():
    gw = new_gateway(["http://127.0.0.1:9"])
    ds, peer = client_side(gw)
    ds.response_head(200, [], None)
    peer.close()
    with trio.fail_after(5):
        await end_stream_with_error(ds, errors.bad_gateway("big", "x"))
    assert ds.client_gone
    ds.sock.close()
