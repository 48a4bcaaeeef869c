"""What a WebSocket route needs to meet real clients, kept apart so that step 5 shows its lesson.

Not a step of its own: step 5's server (stream_server_websocket.py) imports from here what
keeps a client that floods it with messages, or stops reading them, from taking the server's
memory or its thread, and what answers a handshake that went wrong with a clear 4xx:

    from serving_websocket import Channel, Flooding, handshakes
    app.register_blueprint(handshakes)      # 400 or 426, as JSON, for a bad handshake

    @sock.route("/ws")
    def stream(ws) -> None:
        channel = Channel(ws)
        command = channel.receive(timeout)  # None if none came; Flooding past MAX_COMMANDS
        channel.send({"type": "ack"})       # once the client has room, within WRITE_TIMEOUT

This is the WebSocket side of serving.py, whose write timeout it keeps too.
"""

import json
import select
import socket
from collections import deque
from contextlib import suppress
from time import monotonic

from flask import Blueprint, Response, jsonify, request
from simple_websocket import ConnectionClosed
from werkzeug.routing import WebsocketMismatch
from wsproto.utilities import RemoteProtocolError

from serving import WRITE_TIMEOUT

handshakes = Blueprint("handshakes", __name__)  # the error handlers, for each step's app

# A person types a command every second or two, a script sends a few a second. Twenty
# within one second, or twenty waiting while the client reads none of the answers, is a
# flood: the connection is closed with 1008 (policy violation) before it costs memory.
MAX_COMMANDS = 20


class Flooding(Exception):
    """The client sent commands faster than MAX_COMMANDS allows."""


class Channel:
    """One client's WebSocket: its commands read as they arrive, messages sent when it has room."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.arrivals: deque[float] = deque(maxlen=MAX_COMMANDS)  # when the last ones came
        self.waiting: deque = deque()  # commands that came while a message waited for room

    def receive(self, timeout: float | None) -> str | bytes | None:
        """The next command, or None if none came within `timeout` seconds (None: no limit)."""
        return self.waiting.popleft() if self.waiting else self._take(timeout)

    def _take(self, timeout: float | None) -> str | bytes | None:
        message = self.ws.receive(timeout=timeout)
        if message is not None:
            self.arrivals.append(monotonic())
            if len(self.arrivals) == MAX_COMMANDS and self.arrivals[-1] - self.arrivals[0] < 1:
                raise Flooding()
        return message

    def send(self, message: dict) -> None:
        """Send one message as soon as the client has room for it, within WRITE_TIMEOUT."""
        # A client that reads nothing fills the socket's buffers, and ws.send() would block;
        # meanwhile simple-websocket's own thread queues every message that arrives, with no
        # limit and no option to set one. So wait for room here (looking again every 50 ms),
        # taking the commands off that queue as they arrive: Flooding bounds them.
        deadline = monotonic() + WRITE_TIMEOUT
        while not self.has_room():
            if monotonic() > deadline:  # it accepts nothing more: end it, as if it had gone
                raise TimeoutError(f"the client accepted no data for {WRITE_TIMEOUT} s")
            if (command := self._take(timeout=0.05)) is not None:
                self.waiting.append(command)
                if len(self.waiting) >= MAX_COMMANDS:
                    raise Flooding()
        self.ws.send(json.dumps(message))

    def has_room(self) -> bool:
        """Whether the socket takes another message at once, without blocking."""
        try:
            return bool(select.select([], [self.ws.sock], [], 0)[1])
        except ValueError:  # simple-websocket closed the socket: let ws.send() say so
            return True

    def close_for_flooding(self) -> None:
        """Close with 1008 if the closing message fits, and read nothing more either way."""
        with suppress(ConnectionClosed, OSError):  # unless the client has gone already
            if self.has_room():  # 1008: policy violation (RFC 6455, 7.4.1)
                self.ws.close(reason=1008, message=f"more than {MAX_COMMANDS} commands at once")
            # Then stop reading whatever else it sends. With no room, not even the closing
            # message can go: this alone ends the connection.
            self.ws.sock.shutdown(socket.SHUT_RDWR)


@handshakes.app_errorhandler(RemoteProtocolError)
def bad_handshake(error: RemoteProtocolError) -> Response:
    """400 or 426 with a JSON error for an upgrade request that wsproto cannot take."""
    # wsproto, under simple-websocket, checks the upgrade request and says what to answer:
    # 400 when Sec-WebSocket-Key is missing, 426 and the version it speaks for another one.
    hint = error.event_hint
    problem = "Sec-WebSocket-Version must be 13" if hint.status_code == 426 else error
    response = jsonify(error=f"not a WebSocket handshake this server takes: {problem}")
    response.status_code = hint.status_code
    response.headers.extend((name.decode(), value.decode()) for name, value in hint.headers)
    return response


@handshakes.app_errorhandler(WebsocketMismatch)
def wrong_protocol(error: WebsocketMismatch) -> tuple[Response, int]:
    """400 with a JSON error for a plain HTTP request to a WebSocket route."""
    message = f"{request.path} takes WebSocket connections only; the other routes, plain HTTP"
    return jsonify(error=message), 400
