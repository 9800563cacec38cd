"""gunicorn alone on HOST:PORT: how the services were served before they had an edge.

The services are served by granian behind nginx (``python -m gridcommon.serve``). These
settings stay for the benchmarks' trivial reference chain, the fixed yardstick the whole path
is measured against, and for tests of an app with no edge in front of it. One worker process
with threads, as gridcommon.serve runs granian: the services keep their state in memory.
"""
import os

from gridcommon.settings import env_int, env_log_level, env_str

bind = f"{env_str(os.environ, 'HOST', '0.0.0.0')}:{env_int(os.environ, 'PORT', 8000, minimum=1, maximum=65535)}"
workers = 1
worker_class = "gthread"
threads = env_int(os.environ, "THREADS", 16, minimum=1, maximum=256)
timeout = 30
graceful_timeout = 5
# Longer than the balancer's and Prometheus's 5 s polls: a connection closed just as the next
# poll reuses it would read as a failed poll and mark a healthy substation down.
keepalive = 15
# The services write their own access line with the request id; gunicorn's would repeat it.
accesslog = None
errorlog = "-"
loglevel = env_log_level(os.environ)
# gunicorn's control socket lives at one path per user: several services on one
# machine would fight over it, and nothing here uses it.
control_socket_disable = True
