"""gunicorn's settings for every step; gunicorn reads this file from the folder it starts in.

    gunicorn stream_server:app                # gthread: 2 workers x 50 threads
    gunicorn -k gevent stream_server:app      # gevent: 2 workers x 1000 connections

Flags on the command line override what is set here.
"""

import logging
import os
import signal
import subprocess
import sys

bind = "127.0.0.1:5000"
worker_class = "gthread"
workers = 2
# Each worker is a process with its own memory. Step 6 remembers used refresh tokens
# across workers, hosts and restarts only with REDIS_URL set (the ledger then lives in
# Redis); without it, reuse is detected within one process only, as each worker logs.
# gthread: each open stream holds one thread for as long as it runs, so a worker
# holds at most this many streams at once; the next clients wait in the queue.
threads = 50
# gevent: each stream is a greenlet, cheap enough for thousands per worker.
worker_connections = 1000
# For gthread and gevent this is only the worker's heartbeat. The default sync
# worker (-k sync) would kill any request running longer, so no stream there.
timeout = 30
# Stopping. Ctrl-C (SIGINT, which the terminal sends to the master and the workers alike)
# and SIGQUIT are gunicorn's quick shutdown: worker_int below ends each worker at once, and
# its open streams with it (post_fork, one that is still starting). SIGTERM (kill,
# systemd) is the graceful one: the workers stop accepting and give the requests under
# way graceful_timeout seconds to finish, then gunicorn ends them. A stream may run for
# hours, so waiting gunicorn's default 30 s only delays every stop and restart; 5 s lets
# a token request finish. The clients of cut streams see the connection close without the
# final chunk.
graceful_timeout = 5
# Seconds a client may accept no data before its stream is ended and its thread or greenlet
# freed; gunicorn has no such limit, so post_worker_init below puts it on every request's
# socket. Longer than the longest pause between two chunks (60 s), as in the steps' own
# WRITE_TIMEOUT for Flask's server. The environment variable WRITE_TIMEOUT overrides it.
WRITE_TIMEOUT = float(os.environ.get("WRITE_TIMEOUT", "90"))
# gunicorn 25+ opens a control socket in $HOME by default; these servers need none.
control_socket_disable = True


class WriteTimeouts(logging.Filter):
    """gunicorn logs a socket error other than a reset or a broken pipe with its traceback.
    A write that timed out is the client's doing, not a fault: one line says so instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg = "closed a connection whose client accepted no data for %g s"
            record.args = (WRITE_TIMEOUT,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


# Show the servers' own log lines (stream started, finished, disconnected) on
# stderr beside gunicorn's, and one access line per request on stdout. Without
# propagate=False, gunicorn's lines would reach the root handler and print twice.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "filters": {"write_timeouts": {"()": WriteTimeouts}},
    "loggers": {
        "gunicorn.error": {
            "level": "INFO",
            "handlers": ["error_console"],
            "propagate": False,
            "filters": ["write_timeouts"],
        },
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}
# The access line: the Common Log Format, whose every field gunicorn keeps to one safe
# line. h is the peer's address, t the time, r the request line (gunicorn refuses control
# characters in it), s and b are numbers. Left out on purpose: the user name (u), which
# gunicorn decodes from an "Authorization: Basic" header and writes as it comes, so a
# crafted header could forge whole log lines and send escape sequences to the terminal
# that shows them; and the referer and user agent of gunicorn's default format, which may
# carry the control characters that Latin-1 has above 127.
access_log_format = '%(h)s - - %(t)s "%(r)s" %(s)s %(b)s'


def on_starting(server) -> None:
    """Once, in gunicorn's master, before any worker starts: a step that signs tokens
    checks JWT_SECRET_KEY here, so a missing or short key stops gunicorn with the step's
    own message. (A worker that exited over it would be started again, forever.) The check
    runs in a separate interpreter: the master must not import the step itself, or the
    gevent worker could no longer patch what the step imported."""
    module = (server.cfg.wsgi_app or server.app.app_uri).partition(":")[0]
    check = f"import {module} as step\nif hasattr(step, 'load_secret_key'):\n"
    check += "    step.load_secret_key(required=True)"
    # With the master's import path, which holds --pythonpath and --chdir's folders too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    if subprocess.run([sys.executable, "-c", check], env=env).returncode:
        raise SystemExit(1)  # the step has said why


def post_fork(server, worker) -> None:
    """In each new worker, first thing after the fork: a signal to stop ends it at once.
    Until the worker sets its own handlers (a gevent worker first patches the standard
    library, which takes a moment), it has the master's, which only queue the signal for
    the master's loop, and that loop never runs in a worker: a Ctrl-C or a SIGTERM that
    came then was lost, and the master killed the worker after graceful_timeout ("was sent
    SIGKILL! Perhaps out of memory?"). A worker still starting has no request to finish."""
    stops = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
    for stop in stops:
        signal.signal(stop, lambda number, frame: os._exit(0))
    # One that came between the fork and now is in this process's copy of that queue.
    while not server.SIG_QUEUE.empty():
        if server.SIG_QUEUE.get_nowait() in stops:
            os._exit(0)


def post_worker_init(worker) -> None:
    """Each worker, once it has imported its step: the steps that sign tokens load
    JWT_SECRET_KEY here, as their __main__ does for Flask's own server; and the app is
    wrapped to put WRITE_TIMEOUT on its sockets."""
    step = sys.modules.get(getattr(worker.wsgi, "import_name", ""))
    if hasattr(step, "load_secret_key"):
        # Required: a random key per worker would make each refuse the others' tokens.
        worker.wsgi.config["JWT_SECRET_KEY"] = step.load_secret_key(required=True)
    worker.wsgi = with_write_timeout(worker.wsgi)


def with_write_timeout(app):
    """The app, with WRITE_TIMEOUT on the socket of each request it answers. A write that
    times out ends the stream as a client that hung up would: the generator is closed."""
    # The steps' own setter, imported here in the worker, where gevent has patched already.
    from serving import set_write_timeout

    def app_with_write_timeout(environ, start_response):
        set_write_timeout(environ["gunicorn.socket"])
        return app(environ, start_response)

    return app_with_write_timeout


def worker_int(worker) -> None:
    """A worker told to stop at once (Ctrl-C, SIGQUIT) exits now, cutting its open streams.
    Left to gunicorn, a gthread worker would wait for every stream thread to end, until the
    master killed it after graceful_timeout ("was sent SIGKILL! Perhaps out of memory?"),
    and a gevent worker would meet the second signal of a Ctrl-C (the terminal's and the
    master's) while exiting, with a SystemExit traceback."""
    worker.log.info("Worker exiting (pid: %s): open streams are cut", worker.pid)
    os._exit(0)
