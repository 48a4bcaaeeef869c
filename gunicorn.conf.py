"""gunicorn's settings for every step; gunicorn reads this file from the folder it starts in.

    gunicorn stream_server:app                # gthread: 2 workers x 50 threads
    gunicorn -k gevent stream_server:app      # gevent: 2 workers x 1000 connections

Flags on the command line override what is set here.
"""

bind = "127.0.0.1:5000"
worker_class = "gthread"
workers = 2
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
