"""The one way fairbus opens an MQTT client (the provider, users, ledger nodes, benches)."""

from __future__ import annotations

import socket

import aiomqtt

PENDING_CALLS_THRESHOLD = 10_000
"""aiomqtt warns above 10 pending publishes; a ledger front has thousands in flight."""


def mqtt_client(
    host: str,
    port: int,
    identifier: str,
    *,
    username: str | None = None,
    password: str | None = None,
    will: aiomqtt.Will | None = None,
    clean_session: bool | None = None,
    keepalive: int = 60,
) -> aiomqtt.Client:
    """An aiomqtt client with TCP_NODELAY (0.4 ms instead of 88 ms per
    request/response on loopback) and a raised pending-calls threshold."""
    c = aiomqtt.Client(
        host,
        port,
        identifier=identifier,
        username=username,
        password=password,
        will=will,
        clean_session=clean_session,
        keepalive=keepalive,
        protocol=aiomqtt.ProtocolVersion.V311,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    c.pending_calls_threshold = PENDING_CALLS_THRESHOLD
    return c
