"""What every step's server needs to meet real clients, shared so that no step repeats it.

Not a step of its own: each server imports from here what keeps a slow, silent or
hostile client from holding it, and, from step 3 on, what serves HTTPS:

    from serving import TURN, RequestHandler                # every step
    from serving import TURN, RequestHandler, tls_context   # the steps with --cert/--key

    app.run(threaded=True, request_handler=RequestHandler, ssl_context=...)

Under gunicorn, gunicorn.conf.py puts the same write timeout on every connection.
"""

import io
import os
import socket
import ssl
from time import monotonic

from werkzeug.serving import WSGIRequestHandler

# At interval=0 a stream never pauses, and while its client keeps reading, none of its
# writes waits either. Threads take turns regardless, but a gevent greenlet lets the others
# run only when it waits: such a stream would keep its whole worker to itself until it ends.
# So it waits a microsecond every TURN chunks. (Not sleep(0): gevent may then run it again
# before it looks at the network, as gevent's documentation warns.)
TURN = 500
# Seconds a client has to send its whole request head (over HTTPS, to finish the TLS
# handshake first), then to accept each piece of the answer. Without them, a client that
# connects and sends nothing, or that stops reading, holds its thread forever. A client
# may take as long to accept a chunk as the server may take to send one, so WRITE_TIMEOUT
# exceeds the steps' MAX_INTERVAL (60 s). The environment variable WRITE_TIMEOUT overrides
# it, as for gunicorn.
REQUEST_TIMEOUT = 5
WRITE_TIMEOUT = float(os.environ.get("WRITE_TIMEOUT", "90"))


def set_write_timeout(sock: socket.socket) -> None:
    """End the connection of a client that accepts no data for WRITE_TIMEOUT seconds: the
    write that waits fails with TimeoutError, and the stream ends as if the client hung up."""
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: the kernel keeps the time, at no cost
        sock.settimeout(None)  # REQUEST_TIMEOUT is over
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(WRITE_TIMEOUT * 1000))
    else:  # elsewhere Python does, with one more system call for every write
        sock.settimeout(WRITE_TIMEOUT)


class HeadReader(io.RawIOBase):
    """A connection's reads, all within one deadline until the request head is in. A
    timeout on each read alone limits only the silence between two bytes: a client that
    sent one byte every few seconds held its thread for ever. gunicorn and nginx also give
    the whole head a deadline."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        super().__init__()
        self.sock, self.deadline = sock, monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:  # each read may wait only as long as is left
            left = self.deadline - monotonic()
            if left <= 0:
                raise TimeoutError("the request head took too long")
            self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class RequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler, with REQUEST_TIMEOUT and WRITE_TIMEOUT on its connection."""

    timeout = REQUEST_TIMEOUT  # for the head: from the connection to its blank line

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # Werkzeug's reader, replaced by one that keeps the deadline
        self.head = HeadReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.head)

    def run_wsgi(self) -> None:
        self.head.deadline = None  # the request head is in: now the answer
        set_write_timeout(self.connection)
        super().run_wsgi()


class DeferredHandshake(ssl.SSLContext):
    """A server context whose connections do their TLS handshake on their first read, in
    their own thread, within REQUEST_TIMEOUT. By default the handshake happens in accept(),
    in the one thread that accepts every connection: a client that connected and sent
    nothing would stop the server."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):
        return super().wrap_socket(sock, server_side, do_handshake_on_connect=False, **kwargs)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """HTTPS with --cert and --key (without it, anyone on the network path can read the
    bearer tokens); plain HTTP with neither. A ValueError says what is wrong with them."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise ValueError("--cert and --key go together")
    context = DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except OSError as error:  # a missing file, or one that holds no certificate or key
        raise ValueError(f"cannot use --cert {cert} --key {key}: {error}") from None
    return context
