"""Debian's nginx as the reference proxy of `python -m tools.bench_reference`: its config, generated into a
directory of the run, and its command line.

The config is the usual one for streaming through nginx: `least_conn` over the servers with a pool of idle
keep-alive connections to them (`keepalive`, which needs HTTP/1.1 and an empty Connection header upstream), and
`proxy_buffering off`, so each event is forwarded as it arrives. nginx runs in the foreground (`daemon off`, so
the bench stops it by PID) with its pid file, temp paths and error log inside the directory, and no access log.
"""

from __future__ import annotations

from pathlib import Path

NGINX = Path("/usr/sbin/nginx")
WORKER_CONNECTIONS = 8192  # a stream holds two connections (client and upstream): 1,000 streams take 2,000
KEEPALIVE_REQUESTS = 1_000_000  # never close a kept-alive connection for its request count during a run
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # every temp path, so none is outside the directory


def config(directory: Path, port: int, upstreams: list[int], keepalive: int) -> str:
    """nginx.conf for a proxy on 127.0.0.1:`port` over the servers on `upstreams` (ports on 127.0.0.1), with up
    to `keepalive` idle upstream connections kept per worker."""
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in upstreams)
    temp = {name: directory / "temp" / name for name in TEMP_DIRS}
    return f"""daemon off;
worker_processes auto;
worker_rlimit_nofile {2 * WORKER_CONNECTIONS};
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{
    worker_connections {WORKER_CONNECTIONS};
}}
http {{
    access_log off;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    keepalive_requests {KEEPALIVE_REQUESTS};
    upstream servers {{
        least_conn;
{servers}        keepalive {keepalive};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://servers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def command(directory: Path, port: int, upstreams: list[int], keepalive: int) -> list[str]:
    """Writes the config into `directory` and returns the command that runs nginx on it in the foreground."""
    for sub in TEMP_DIRS:
        (directory / "temp" / sub).mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(config(directory, port, upstreams, keepalive))
    return [str(NGINX), "-p", f"{directory}/", "-c", str(conf), "-e", str(directory / "error.log")]
