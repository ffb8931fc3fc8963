"""The SuperLink gate (fedrg.deploy.superlink_gate): what the public listener serves.

Fast tests of the path rule (property-tested) and of the ASGI gate in front of Flower's
real SuperLink application: a request on the public port never reaches the Control or
Runtime API, the operator's port reaches everything. The end-to-end version with real
processes is tests/adversary/test_deploy_attacks.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedrg.deploy.superlink_gate import PublicGate, public_path_allowed, split_args

OPERATOR_PORT, PUBLIC_PORT = 41000, 9092

OPERATOR_PATHS = [
    "/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-nodes",
    "/v1/control/list-runs", "/v1/control/stop-run", "/v1/runtime/get-nodes",
    "/v1/runtime/push-messages", "/v1/runtime/pull-messages", "/docs", "/openapi.json",
    "/v1/fleet/../control/start-run", "/v1/fleet//x", "/", "",
]


@pytest.mark.parametrize("path", OPERATOR_PATHS)
def test_operator_paths_are_not_public(path):
    assert not public_path_allowed(path)


@pytest.mark.parametrize("path", ["/health", "/v1/fleet/activate-node", "/v1/fleet/pull-messages",
                                  "/v1/fleet/get-fab", "/v1/fleet/push-messages"])
def test_fleet_and_health_are_public(path):
    assert public_path_allowed(path)


@given(st.text(alphabet="/abcdefghijklmnopqrstuvwxyz-._v1", max_size=40))
def test_only_fleet_prefix_or_health_is_public(path):
    if public_path_allowed(path):
        assert path == "/health" or (path.startswith("/v1/fleet/") and ".." not in path)


def _call(app, *, port: int, path: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "headers": [], "query_string": b"", "server": ("127.0.0.1", port),
             "client": ("127.0.0.1", 50000), "scheme": "https", "http_version": "1.1",
             "root_path": "", "asgi": {"version": "3.0"}}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


@pytest.fixture(scope="module")
def flower_app():
    """Flower's real SuperLink FastAPI application (in-memory state, no lifespan started)."""
    from flwr.superlink.main import create_app

    return create_app()


@pytest.mark.parametrize("path", ["/v1/control/start-run", "/v1/control/register-node",
                                  "/v1/control/list-runs", "/v1/runtime/get-nodes"])
def test_gate_refuses_operator_api_on_the_public_port(flower_app, path):
    gate = PublicGate(flower_app, operator_port=OPERATOR_PORT)
    status, body = _call(gate, port=PUBLIC_PORT, path=path)
    assert status == 403
    assert "Fleet API" in json.loads(body)["detail"]
    assert gate.refused == 1


def test_gate_passes_everything_on_the_operator_port_and_fleet_on_the_public_port(flower_app):
    gate = PublicGate(flower_app, operator_port=OPERATOR_PORT)
    # Flower answers these itself (an empty protobuf body is a Flower error, not our 403)
    status, _ = _call(gate, port=OPERATOR_PORT, path="/v1/control/list-runs")
    assert status != 403
    status, _ = _call(gate, port=PUBLIC_PORT, path="/v1/fleet/get-run")
    assert status != 403
    status, _ = _call(gate, port=PUBLIC_PORT, path="/health")
    assert status == 405 or status == 200  # /health is GET; POST reaches Flower's router
    assert gate.refused == 0


def test_split_args_takes_out_the_public_listener():
    host, port, rest = split_args(["--public-host", "0.0.0.0", "--port", "1", "--public-port",
                                   "9092", "--insecure"])
    assert (host, port, rest) == ("0.0.0.0", 9092, ["--port", "1", "--insecure"])
    with pytest.raises(SystemExit, match="required"):
        split_args(["--port", "1"])
