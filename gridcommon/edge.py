"""The edge every service is served behind: nginx, buffering whole requests in front of granian.

A server whose threads read requests themselves lets a client that connects and sends nothing,
or sends its headers or body a byte at a time, hold one of the 16 threads for as long as it
likes: a few hundred of them take a service off the network. nginx reads every request on
its event loop instead, where a slow or idle client costs a socket and a few KiB, and hands
granian (gridcommon.serve) a request only once it has fully arrived, over a Unix socket only
it can reach. granian has no body timeout and no caps per address: the edge's are the ones.

Settings (environment, read once at start; every service and port the same):

| Variable                          | Default | Meaning                                                                 |
|-----------------------------------|---------|-------------------------------------------------------------------------|
| `EDGE_HEADER_TIMEOUT_SECONDS`     | `5`     | Time from connecting for the request line and headers to arrive; past it the connection is closed |
| `EDGE_BODY_TIMEOUT_SECONDS`       | `5`     | Longest pause between two reads of a request body; past it the connection is closed |
| `EDGE_KEEPALIVE_TIMEOUT_SECONDS`  | `15`    | How long an idle kept-alive connection stays open between requests (longer than the 5 s polls) |
| `EDGE_MAX_REQUESTS_PER_CLIENT`    | `128`   | Requests one client address may have open at once (headers read, body arriving or answer pending); past it, 429 |
| `EDGE_MAX_REQUESTS`               | `1024`  | Requests all clients together may have open at once; past it, 429      |
| `EDGE_MAX_CONNECTIONS`            | `4096`  | Open connections in all, idle ones included; past it new ones wait in the kernel's backlog |
| `EDGE_MAX_HEADER_BYTES`           | `8192`  | Largest request line or header line; a longer one, or a head over 4 of these in all, is 431 (414 for the line) |
| `EDGE_MAX_BODY_BYTES`             | `65536` | Largest body taken in (the services refuse over 16 KiB with their own 413); past it, 413 |
| `EDGE_RUN_DIR`                    | system temp | Where each service's edge keeps its generated nginx.conf, pid file and upstream socket (a fresh folder per start) |
| `EDGE_NGINX`                      | `nginx` | The nginx program (Debian's `nginx-light` has every module used)         |

Past the edge granian refuses more than 100 headers with 431 (nginx cannot count them); the edge
answers that refusal with its own JSON 431.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gridcommon.settings import env_float, env_int, env_str

# granian closes a connection idle for 30 s (its HTTP/1 header read timeout, which also counts
# between kept-alive requests): the edge's idle upstream connections must close before, or the
# edge could reuse one granian is closing.
UPSTREAM_KEEPALIVE_SECONDS = 10
# Idle connections the edge keeps to granian: more than its 16 threads, so a burst never waits on a connect.
UPSTREAM_IDLE_CONNECTIONS = 32
# Longest the edge waits for granian's answer: past the longest any service takes on purpose (a long
# poll waits under 30 s); then the client gets a 503.
UPSTREAM_READ_TIMEOUT_SECONDS = 35
# The status the per-address and overall caps refuse with inside nginx: one no service ever answers,
# so that it can be told apart from a service's own 429 (see _proxy_directives); the client gets 429.
LIMIT_STATUS = 529
# Refusals met while a request is passed on, so answered in its location (see _proxy_directives):
# nginx's own (the caps, a body too large, granian too slow) and granian's 431.
UPSTREAM_PHASE = (413, 431, LIMIT_STATUS, 504)
# Requests on one kept-alive client connection before the edge closes it (see render_nginx_conf).
KEEPALIVE_REQUESTS = 1_000_000
# How long a stopping edge lets requests in flight finish before it closes them.
SHUTDOWN_SECONDS = 3


@dataclass(frozen=True)
class EdgeSettings:
    host: str
    port: int
    header_timeout_seconds: float
    body_timeout_seconds: float
    keepalive_timeout_seconds: float
    max_requests_per_client: int
    max_requests: int
    max_connections: int
    max_header_bytes: int
    max_body_bytes: int
    nginx: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "EdgeSettings":
        return cls(
            host=env_str(env, "HOST", "0.0.0.0"),
            port=env_int(env, "PORT", 8000, minimum=1, maximum=65535),
            header_timeout_seconds=env_float(env, "EDGE_HEADER_TIMEOUT_SECONDS", 5.0, minimum=0.1, maximum=300),
            body_timeout_seconds=env_float(env, "EDGE_BODY_TIMEOUT_SECONDS", 5.0, minimum=0.1, maximum=300),
            keepalive_timeout_seconds=env_float(env, "EDGE_KEEPALIVE_TIMEOUT_SECONDS", 15.0, minimum=0, maximum=3600),
            max_requests_per_client=env_int(env, "EDGE_MAX_REQUESTS_PER_CLIENT", 128, minimum=1, maximum=100_000),
            max_requests=env_int(env, "EDGE_MAX_REQUESTS", 1024, minimum=1, maximum=100_000),
            max_connections=env_int(env, "EDGE_MAX_CONNECTIONS", 4096, minimum=64, maximum=1_000_000),
            max_header_bytes=env_int(env, "EDGE_MAX_HEADER_BYTES", 8192, minimum=1024, maximum=1024 * 1024),
            max_body_bytes=env_int(env, "EDGE_MAX_BODY_BYTES", 64 * 1024, minimum=1024, maximum=64 * 1024 * 1024),
            nginx=env_str(env, "EDGE_NGINX", "nginx"),
        )


# The edge's own refusals, as JSON of the services' one error shape; nginx's would be HTML.
# Keyed by the status nginx reaches them with; the second field is the status the client sees.
REFUSALS: dict[int, tuple[int, str, str]] = {
    400: (400, "bad_request", "The request is not valid HTTP/1.1: its request line, method or a header is malformed "
                              "(control characters are not allowed in any of them). Fix the request and send it again."),
    # Only ever the edge's own: the services' 404s pass through as they are.
    404: (404, "not_found", "No such endpoint. See the README's endpoint table for what this service offers."),
    # The services' own 413 (gridcommon.web), for a body past the edge's larger limit.
    413: (413, "request_entity_too_large", "Request body too large: at most 16384 bytes are accepted."),
    414: (414, "uri_too_long", "The request line is too long: keep the URL under 4 KiB."),
    # nginx's own code for a request head over its buffers; the client gets 431.
    494: (431, "request_header_fields_too_large", "A request header is too large, or there are too many of them: "
                                                  "keep each header under 8 KiB."),
    # granian's, for more than 100 headers: it answers them with an empty body.
    431: (431, "request_header_fields_too_large", "A request header is too large, or there are too many of them: "
                                                  "keep each header under 8 KiB and send at most 100."),
    LIMIT_STATUS: (429, "too_many_connections", "Too many requests are open at once, from your address or in all. "
                                       "Finish or close the ones you have, then retry in a moment."),
    501: (501, "not_implemented", "The request's Transfer-Encoding is not supported; send the body with a "
                                  "Content-Length instead."),
    504: (503, "service_unavailable", "The service did not answer in time; retry in a moment."),
}


def _quoted(text: str) -> str:
    """``text`` as one nginx string argument: single-quoted, with quotes and backslashes escaped."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _error_pages(statuses: object, indent: str) -> str:
    return "\n".join(f"{indent}error_page {status} ={REFUSALS[status][0]} /.edge/refused/{status};"
                     for status in statuses)


def _refusal_blocks() -> tuple[str, str]:
    """The server's ``error_page`` lines (refusals of a request's head) and the internal locations
    that answer every refusal.

    By URI, not a named location: a refusal of the request line itself (414, some 400s) has no
    URI yet, and nginx cannot redirect such a request to a named location.
    """
    pages = _error_pages((status for status in REFUSALS if status not in UPSTREAM_PHASE), "        ")
    locations = []
    for status, (answered, error, message) in REFUSALS.items():
        body = json.dumps({"error": error, "message": message})
        headers = "            add_header Retry-After 1 always;\n" if answered in (429, 503) else ""
        if status == 413:
            # The service's own 413, intercepted (see _proxy_directives), keeps its request id; nginx's
            # own has none, and nginx adds no header whose value is empty.
            headers += "            add_header X-Request-ID $upstream_http_x_request_id always;\n"
        locations.append(
            f"        location = /.edge/refused/{status} {{\n"
            f"            internal;\n"
            f"            default_type application/json;\n{headers}"
            f"            return {answered} {_quoted(body)};\n"
            f"        }}"
        )
    return pages, "\n".join(locations)


def _seconds(value: float) -> str:
    return f"{max(1, round(value * 1000))}ms"


def _proxy_directives() -> str:
    """How a location hands its requests to granian.

    granian answers more than 100 headers with an empty 431; to answer it as JSON the edge must
    intercept upstream errors, and it intercepts every status its location has an ``error_page``
    for. So the location lists only statuses no service answers itself (431, 504 and the caps'
    LIMIT_STATUS) and 413, whose answer is the services' own word for word. A location with pages
    of its own inherits none of the server's, so nginx's refusals here are listed here too.
    """
    return f"""            proxy_pass http://service;
            proxy_intercept_errors on;
{_error_pages(UPSTREAM_PHASE, "            ")}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            # Overwritten, never appended to: a client cannot choose the address the service sees.
            proxy_set_header X-Real-IP $remote_addr;
            proxy_request_buffering on;
            proxy_buffer_size 16k;
            proxy_buffers 16 16k;
            proxy_connect_timeout 2s;
            proxy_send_timeout 10s;
            proxy_read_timeout {UPSTREAM_READ_TIMEOUT_SECONDS}s;
            # Tried again only when the connection fails (an idle kept-alive one granian just closed),
            # and never a POST that was sent: a charge request is not idempotent.
            proxy_next_upstream error;
            proxy_next_upstream_tries 2;
            # A request passed on runs to its end even if its client has gone: granian drops a request
            # whose connection closes before its app has started, so a charge request a caller gave up on
            # would be admitted or not by chance. Admitted, the balancer frees it as a lost answer.
            proxy_ignore_client_abort on;
"""


def render_nginx_conf(settings: EdgeSettings, run_dir: Path, upstream_socket: Path, user: str | None) -> str:
    """nginx.conf for one service: ``settings.host:port`` in front of granian on ``upstream_socket``.

    ``user`` is for nginx started as root, which would otherwise run its worker as nobody, who
    cannot reach the upstream socket; anyone else runs it as themselves.
    """
    pages, locations = _refusal_blocks()
    proxy = _proxy_directives()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    user_line = f"user {user};\n" if user else ""
    # The upstream connections count against worker_connections too, as does the listener.
    worker_connections = settings.max_connections + UPSTREAM_IDLE_CONNECTIONS + settings.max_requests + 16
    return f"""# Generated by gridcommon.edge at start; edits are lost at the next start.
{user_line}daemon off;
worker_processes 1;
pid {run_dir}/nginx.pid;
# Warnings too: each refusal by a cap is one ("limiting connections by zone ..., client: ...").
error_log stderr warn;
worker_rlimit_nofile {2 * worker_connections};
worker_shutdown_timeout {SHUTDOWN_SECONDS}s;
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {run_dir}/body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;

    # The whole head within the header timeout (counted from the connect), the body with no
    # pause longer than the body timeout; idle keep-alive is a separate, longer allowance.
    client_header_timeout {_seconds(settings.header_timeout_seconds)};
    client_body_timeout {_seconds(settings.body_timeout_seconds)};
    keepalive_timeout {_seconds(settings.keepalive_timeout_seconds)};
    # nginx's default closes a kept-alive connection after 1,000 requests: a caller that had already
    # sent its next request on it sees that one fail. The services never close one themselves.
    keepalive_requests {KEEPALIVE_REQUESTS};
    send_timeout 10s;
    # A timed-out client is cut with a reset, not a 408 (nginx sends none): its socket's buffers go at once.
    reset_timedout_connection on;
    client_header_buffer_size 1k;
    large_client_header_buffers 4 {settings.max_header_bytes};
    # Bodies are read whole into memory before granian sees them, never into a file.
    client_max_body_size {settings.max_body_bytes};
    client_body_buffer_size {settings.max_body_bytes};
    client_body_in_single_buffer on;

    limit_conn_zone $binary_remote_addr zone=per_client:4m;
    map $server_port $edge_all {{ default all; }}
    limit_conn_zone $edge_all zone=all_clients:64k;
    limit_conn_status {LIMIT_STATUS};
    limit_conn_log_level warn;

    upstream service {{
        # The one server: never marked down after a failure (max_fails=0), so a restart heals at once.
        server unix:{upstream_socket} max_fails=0;
        keepalive {UPSTREAM_IDLE_CONNECTIONS};
        keepalive_timeout {UPSTREAM_KEEPALIVE_SECONDS}s;
    }}

    server {{
        listen {host}:{settings.port} backlog=4096;
        limit_conn per_client {settings.max_requests_per_client};
        limit_conn all_clients {settings.max_requests};

{pages}

        location / {{
{proxy}        }}

        # nginx refuses TRACE itself, whatever the path: the service answers it instead, with its own
        # 405 and the Allow header naming the methods the path takes.
        error_page 405 = @service;
        location @service {{
{proxy}        }}

{locations}
    }}
}}
"""


def upstream_socket_path(run_dir: Path) -> Path:
    return run_dir / "granian.sock"


def edge_user() -> str | None:
    """The user nginx's worker must run as: this one, when started as root (see render_nginx_conf)."""
    if os.geteuid() != 0:
        return None
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
