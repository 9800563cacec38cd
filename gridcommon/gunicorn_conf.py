"""gunicorn settings shared by every service, in compose and in local mode.

One worker process with threads: each service keeps its state (sessions, the
balancer's view of the grid, the peer-balancing state machine) in memory, so a
single process makes admission atomic under one lock and keeps the Prometheus
metrics exact without multiprocess mode. Threads give the concurrency.

Every service runs behind its edge (``python -m gridcommon.serve``, see gridcommon.edge),
which hands it a listening Unix socket (its descriptor in EDGE_UPSTREAM_FD) that only the edge
reaches: gunicorn then takes only requests that have fully arrived. Without it gunicorn listens
on HOST:PORT itself, as the benchmarks' trivial reference chain does.
"""
import os

from gridcommon.settings import env_int, env_log_level, env_str

_upstream_fd = env_str(os.environ, "EDGE_UPSTREAM_FD", "")
bind = (
    f"fd://{int(_upstream_fd)}"
    if _upstream_fd
    else f"{env_str(os.environ, 'HOST', '0.0.0.0')}:{env_int(os.environ, 'PORT', 8000, minimum=1, maximum=65535)}"
)
workers = 1
worker_class = "gthread"
threads = env_int(os.environ, "THREADS", 16, minimum=1, maximum=256)
timeout = 30
graceful_timeout = 5
# Longer than the balancer's and Prometheus's 5 s polls: a connection closed just as the next
# poll reuses it would read as a failed poll and mark a healthy substation down. Behind the
# edge, longer than the edge's own idle upstream connections (gridcommon.edge), for the same reason.
keepalive = 15
# The services write their own access line with the request id; gunicorn's would repeat it.
accesslog = None
errorlog = "-"
loglevel = env_log_level(os.environ)
# gunicorn's control socket lives at one path per user: several services on one
# machine would fight over it, and nothing here uses it.
control_socket_disable = True
