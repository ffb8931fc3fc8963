"""Flower's SuperLink with the operator's API closed to the network.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr
supernode register``, ``flwr list``) and the Runtime API (the ServerApp) on one HTTPS port;
``--control-api-address`` is deprecated and ignored, and Control API authentication is a
no-op unless Flower's OIDC plug-in (not in the open-source distribution) is enabled. Anyone
holding ``ca.crt`` who can reach the port could register a node or submit a run.

This module runs Flower's own SuperLink application (``flwr.superlink.main.create_app``,
configured from ``flower-superlink``'s own command line) on **two listeners** of one
uvicorn server, both with the SuperLink's TLS certificate:

- the **operator listener** (``--host``/``--port``, bound to a loopback address by
  ``fedrg server``) serves every API; Flower's SuperExec and ServerApp and the operator's
  ``flwr`` CLI use it;
- the **public listener** (``--public-host``/``--public-port``) serves only what a
  SuperNode needs: ``/v1/fleet/*`` (still behind Flower's node authentication) and
  ``/health``. Anything else is answered ``403`` before Flower sees the request.

Run as ``python -m fedrg.deploy.superlink_gate --public-host H --public-port P
<flower-superlink arguments>``.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PREFIXES = ("/v1/fleet/",)
PUBLIC_PATHS = ("/health",)
REFUSAL = ("this address serves only the Fleet API of hospital SuperNodes; the operator's "
           "Control and Runtime APIs listen on the server's loopback address only")


def public_path_allowed(path: str) -> bool:
    """True when ``path`` may be served on the public listener (Fleet API and health).

    Parameters
    ----------
    path : str
        The request path (ASGI ``scope["path"]``, already percent-decoded).
    """
    if ".." in path or "//" in path:
        return False
    return path in PUBLIC_PATHS or any(path.startswith(p) for p in PUBLIC_PREFIXES)


class PublicGate:
    """ASGI wrapper: requests that arrive on a port other than ``operator_port`` may reach
    only :func:`public_path_allowed` paths; all others get ``403`` and never reach Flower.

    The listening port is read from the ASGI ``server`` entry, which uvicorn fills from the
    accepting socket's own address (the client cannot choose it).
    """

    def __init__(self, app: ASGIApp, *, operator_port: int) -> None:
        self.app = app
        self.operator_port = operator_port
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server")
            port = server[1] if server else None
            if port != self.operator_port and not public_path_allowed(scope.get("path", "")):
                self.refused += 1
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": REFUSAL}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def split_args(argv: Sequence[str]) -> tuple[str, int, list[str]]:
    """Take ``--public-host H --public-port P`` out of ``argv``; the rest is Flower's.

    Raises
    ------
    SystemExit
        When either is missing.
    """
    rest: list[str] = []
    host: str | None = None
    port: int | None = None
    it = iter(argv)
    for arg in it:
        if arg == "--public-host":
            host = next(it, None)
        elif arg == "--public-port":
            value = next(it, None)
            port = int(value) if value and value.isdigit() else None
        else:
            rest.append(arg)
    if not host or port is None:
        raise SystemExit("superlink_gate: --public-host HOST and --public-port PORT are required")
    return host, port, rest


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - runs as a process
    """Start Flower's SuperLink app on the operator listener and the gated public listener."""
    import importlib

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # the module, not the function of the same name that flwr.superlink.cli exports
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    public_host, public_port, flower_args = split_args(sys.argv[1:] if argv is None else argv)
    sys.argv = ["flower-superlink", *flower_args]
    config = fs._parse_superlink_lifespan_config()  # Flower's own argument handling
    fs.log(fs.INFO, "Starting Flower SuperLink")  # as flower-superlink does
    if config.port == public_port:
        raise SystemExit("superlink_gate: --public-port must differ from --port")
    app = create_app(config, fs.SuperLinkLifespan)
    gate = PublicGate(app, operator_port=config.port)
    sockets = [_bind(config.host, config.port), _bind(public_host, public_port)]
    uv = uvicorn.Config(
        app=gate, reload=False, access_log=True, workers=1,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
    )
    print(f"fedrg: SuperLink operator API on {config.host}:{config.port}; public Fleet API on "
          f"{public_host}:{public_port}", flush=True)
    uvicorn.Server(uv).run(sockets=sockets)


if __name__ == "__main__":  # pragma: no cover
    main()
