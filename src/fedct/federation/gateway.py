"""The Fleet gateway: the one port of the coordinating centre that hospitals reach.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), its Control API (``flwr``: register
nodes, list and submit runs) and its Runtime API (the ServerApp) on one HTTPS port, and the
Control API has no authentication of its own outside Flower's enterprise edition. Whoever
reaches that port with the federation's CA could register a key of their own, list nodes
and runs, and submit an app whose Python runs at the centre. So the SuperLink listens on
127.0.0.1 only, where the centre's ``flwr`` reaches it, and this gateway listens on the
hospital-facing address. It terminates TLS with the SuperLink's certificate and forwards
``POST /v1/fleet/<name>``, and nothing else, to the SuperLink over TLS, verifying it with
the CA. Every Fleet call is still authenticated by the SuperLink (``--enable-supernode-auth``:
signed by a registered node key). Anything else gets 403 and never reaches the SuperLink.

Run at the centre (``python -m fedct.federation.gateway --help``)::

    python -m fedct.federation.gateway --listen 0.0.0.0:8000 --superlink 127.0.0.1:9093 \\
        --ssl-ca-certfile pki/ca.crt --ssl-certfile pki/server.pem --ssl-keyfile pki/server.key

Bodies are streamed both ways, never held whole in memory.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click

from fedct.errors import FedctError

#: The only requests forwarded: one Fleet API call, by name (no dot segments, no encoding).
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
REFUSAL = "only the Fleet API is served here"
# Headers that describe one hop, not the message (RFC 9110 7.6.1), and the host.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                  "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                  "host"})
UPSTREAM_TIMEOUT_S = 300.0


def split_address(address: str) -> tuple[str, int]:
    """``("host", port)`` of ``host:port`` or ``[v6]:port``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FedctError(f"{address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_private_key(path: Path) -> None:
    """Refuse a private key that a group or others may read or write (like ``ssh``)."""
    try:
        mode = Path(path).stat().st_mode & 0o777
    except OSError as exc:
        raise FedctError(f"{path}: cannot read the private key ({exc.strerror})") from exc
    if mode & 0o077:
        raise FedctError(f"{path}: private key is accessible to group or others (mode "
                         f"{mode:04o}); run `chmod 600 {path}`")


def check_upstream(superlink: str) -> None:
    """Refuse a SuperLink address that is not on loopback."""
    host, _ = split_address(superlink)
    if not is_loopback(host):
        raise FedctError(f"--superlink {superlink}: the SuperLink's own port must stay on "
                         "loopback (127.0.0.1); only this gateway faces the hospitals")


def create_app(superlink: str, ca_cert: Path) -> Any:
    """The gateway's ASGI app: Fleet calls to ``https://SUPERLINK``, 403 for the rest.

    ``superlink`` is the SuperLink's ``host:port`` on loopback; ``ca_cert`` verifies its
    certificate (which must name that host).
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    check_upstream(superlink)
    verify = ssl.create_default_context(cafile=str(ca_cert))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
                base_url=f"https://{superlink}", verify=verify, follow_redirects=False,
                timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=10.0)) as client:
            app.state.client = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not FLEET_PATH.fullmatch(path):
            return JSONResponse({"detail": REFUSAL}, status_code=403)
        client: httpx.AsyncClient = request.app.state.client
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        upstream = client.build_request("POST", path, headers=headers,
                                        content=request.stream())
        try:
            reply = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"detail": f"SuperLink unreachable: {type(exc).__name__}"},
                                status_code=502)
        return StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code,
            headers={k: v for k, v in reply.headers.items() if k.lower() not in _HOP},
            background=BackgroundTask(reply.aclose))

    return Starlette(routes=[Route("/{path:path}", forward,
                                   methods=["GET", "HEAD", "POST", "PUT", "PATCH",
                                            "DELETE", "OPTIONS"])],
                     lifespan=lifespan)


def serve(listen: str, superlink: str, ca_cert: Path, server_cert: Path,
          server_key: Path) -> None:
    """Serve the gateway on ``listen`` (``host:port``) with TLS until interrupted."""
    import uvicorn

    check_upstream(superlink)
    for path in (ca_cert, server_cert):
        if not Path(path).is_file():
            raise FedctError(f"{path}: no such certificate")
    check_private_key(server_key)
    host, port = split_address(listen)
    uvicorn.run(create_app(superlink, Path(ca_cert)), host=host, port=port,
                ssl_certfile=str(server_cert), ssl_keyfile=str(server_key),
                log_level="info", server_header=False)


@click.command()
@click.option("--listen", required=True,
              help="HOST:PORT the hospitals' SuperNodes dial (e.g. 0.0.0.0:8000).")
@click.option("--superlink", default="127.0.0.1:9093", show_default=True,
              help="The SuperLink's HOST:PORT, on loopback (its --host/--port).")
@click.option("--ssl-ca-certfile", "ca_cert", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The federation's CA (verifies the SuperLink).")
@click.option("--ssl-certfile", "server_cert", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The SuperLink's certificate (naming the address hospitals dial).")
@click.option("--ssl-keyfile", "server_key", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Its private key (mode 0600).")
def main(listen: str, superlink: str, ca_cert: Path, server_cert: Path,
         server_key: Path) -> None:
    """Expose only the Fleet API of a loopback SuperLink on LISTEN."""
    try:
        serve(listen, superlink, ca_cert, server_cert, server_key)
    except FedctError as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
