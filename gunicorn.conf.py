"""gunicorn's settings for every step; gunicorn reads this file from the folder it starts in.

    gunicorn stream_server:app                # gthread: 2 workers x 50 threads
    gunicorn -k gevent stream_server:app      # gevent: 2 workers x 1000 connections

Flags on the command line override what is set here.
"""

import os
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
# gunicorn 25+ opens a control socket in $HOME by default; these servers need none.
control_socket_disable = True
# Show the servers' own log lines (stream started, finished, disconnected) on
# stderr beside gunicorn's, and one access line per request on stdout. Without
# propagate=False, gunicorn's lines would reach the root handler and print twice.
logconfig_dict = {
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}



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


def post_worker_init(worker) -> None:
    """Each worker, once it has imported its step: the steps that sign tokens load
    JWT_SECRET_KEY here, as their __main__ does for Flask's own server."""
    step = sys.modules.get(getattr(worker.wsgi, "import_name", ""))
    if hasattr(step, "load_secret_key"):
        # Required: a random key per worker would make each refuse the others' tokens.
        worker.wsgi.config["JWT_SECRET_KEY"] = step.load_secret_key(required=True)
