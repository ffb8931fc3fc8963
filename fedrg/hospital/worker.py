"""The hospital's long-lived worker: torch, model, cohort and accountant stay warm.

Flower's ``flwr-clientapp`` answers one message and exits, so every message used to pay
process start, imports, model build and cohort parsing. ``fedrg client`` therefore starts
this worker next to the SuperNode; the ClientApp Flower starts per message only forwards the
message to it (:func:`forward`) and relays the reply.

* **Transport**: a Unix socket (mode 0600) in the hospital's private socket directory, with
  a same-user peer check and an HMAC challenge in both directions on a fresh 32-byte key in
  ``worker.key`` (0600), all from :mod:`fedrg.hospital.local_socket` (shared with the
  ClientApp fork server). Messages are ``.npz`` archives read with ``allow_pickle=False``:
  nothing received is unpickled.
* **Trust**: the worker answers with *its own* site config (from the hospital's settings),
  never one sent to it, and runs the same :func:`fedrg.hospital.answer.answer` as the
  in-process ClientApp: the hospital's policy, budget and ledger checks apply unchanged.
  The ClientApp that forwards is the pinned one (``fedrg.deploy.pinned_clientapp`` checks
  the server's bundle first); the worker itself runs the hospital's installed fedrg.
* **Failure**: no worker (no socket, nobody listening) -> the ClientApp answers in-process
  as before (slower, same result). A worker that fails *while* answering is an error for
  that message, never a retry (a train request may already have spent budget).

Run by ``fedrg client``; by hand: ``python -m fedrg.hospital.worker --site '<SiteConfig JSON>'``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedrg.config import SiteConfig
from fedrg.errors import FedrgError
from fedrg.hospital import local_socket
from fedrg.payload import Payload, meta_from_json, meta_to_json

log = logging.getLogger("fedrg.worker")

KEY_NAME = "worker.key"
SOCKET_NAME = "worker.sock"
PURPOSE = "hospital worker"
MAX_MESSAGE = 0xFFFFFFFF


class WorkerError(FedrgError):
    """The hospital worker refused or failed a message (its public reason is relayed)."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self._public = public or "WorkerError: the hospital worker could not answer"

    def public_message(self) -> str:
        return self._public


def socket_path(state_dir: str | Path, *, create: bool = False) -> Path | None:
    """Where the worker of ``state_dir`` listens (its private socket directory; ``None``
    before a worker has made it)."""
    return local_socket.socket_path(state_dir, SOCKET_NAME, create=create)


# --------------------------------------------------------------------------- wire format

def _pack(header: dict[str, Any], parts: dict[str, Payload]) -> bytes:
    arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(header))}
    for prefix, p in parts.items():
        arrays[f"{prefix}.meta"] = np.array(meta_to_json(p.meta))
        for name, a in p.arrays.items():
            arrays[f"{prefix}/{name}"] = np.asarray(a)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _unpack(data: bytes, prefixes: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Payload]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        parts = {}
        for prefix in prefixes:
            arrays = {k[len(prefix) + 1:]: z[k] for k in z.files if k.startswith(prefix + "/")}
            parts[prefix] = Payload(meta=meta_from_json(str(z[f"{prefix}.meta"])), arrays=arrays)
    return header, parts


# --------------------------------------------------------------------------- client side

def forward(site: SiteConfig, action: str, payload: Payload, state: Payload) -> Payload | None:
    """Have the hospital's worker answer ``action``; ``None`` when no worker is running.

    ``state`` is replaced in place by the worker's updated state. Raises
    :class:`WorkerError` when the worker refused or failed the message.
    """
    try:
        address = socket_path(site.state_dir)
        key = local_socket.read_key(Path(site.state_dir) / KEY_NAME)
    except local_socket.UnsafeSocketError as err:
        raise WorkerError(f"hospital worker socket refused: {err}") from None
    if address is None or key is None or not address.exists():
        return None
    try:
        conn = local_socket.connect(address, key, purpose=PURPOSE)
    except (FileNotFoundError, ConnectionRefusedError) as err:  # stale socket of a stopped worker
        log.warning("hospital worker at %s does not answer (%s); answering in this process",
                    address, err)
        return None
    except local_socket.UnsafeSocketError as err:
        raise WorkerError(f"hospital worker socket refused: {err}") from None
    with conn:
        try:
            conn.settimeout(None)
            local_socket.send_frame(
                conn, _pack({"action": action}, {"payload": payload, "state": state}))
            header, parts = _unpack(local_socket.recv_frame(conn, MAX_MESSAGE), ("reply", "state"))
        except (OSError, EOFError, ValueError) as err:
            raise WorkerError(f"the hospital worker stopped while answering {action} ({err}); "
                              "see its log (state dir logs/worker.log)") from None
    if not header.get("ok"):
        raise WorkerError(f"hospital worker: {header.get('detail', '')}", header.get("public"))
    state.meta, state.arrays = parts["state"].meta, parts["state"].arrays
    return parts["reply"]


# --------------------------------------------------------------------------- worker side

class HospitalWorker:
    """Serves one hospital's messages, one at a time, on a local authenticated socket."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self.state_dir = Path(site.state_dir)
        self.key_file = self.state_dir / KEY_NAME
        self.address: Path | None = None  # in the private socket directory, made by open()
        self._key = b""
        self._listener: socket.socket | None = None

    def open(self) -> None:
        """Write a fresh key and listen (the socket of a stopped worker is replaced).

        Raises
        ------
        FedrgError
            If another worker already listens for this state directory.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        address = socket_path(self.state_dir, create=True)
        assert address is not None
        self._listener, self._key = local_socket.listen(
            address, self.key_file, what=f"hospital worker (state dir {self.state_dir})")
        self.address = address

    def warm_up(self) -> None:
        """Import the heavy modules now, not on the first message."""
        import fedrg.hospital.secure
        import fedrg.hospital.site
        import fedrg.train.loop  # noqa: F401
        from fedrg.hospital.site import get_site

        get_site(self.site)

    def serve_one(self) -> None:
        """Accept one connection and answer its message."""
        from fedrg.hospital.answer import answer

        assert self._listener is not None, "call open() first"
        conn, _ = self._listener.accept()
        with conn:
            try:
                local_socket.authenticate_client(conn, self._key, purpose=PURPOSE)
            except local_socket.UnsafeSocketError as err:  # wrong key or a probe: keep serving
                log.warning("refused a connection to the hospital worker: %s", err)
                return
            try:
                conn.settimeout(None)
                header, parts = _unpack(local_socket.recv_frame(conn, MAX_MESSAGE),
                                        ("payload", "state"))
            except (OSError, EOFError, ValueError) as err:
                log.warning("unreadable message to the hospital worker: %s", err)
                return
            action = str(header.get("action", ""))
            state = parts["state"]
            t0 = time.perf_counter()
            try:
                reply = answer(action, self.site, parts["payload"], state)
                out = _pack({"ok": True}, {"reply": reply, "state": state})
                # local log only (benchmarks/deployment_latency.py reads it); never sent
                log.info("answered %s in %.3f s", action, time.perf_counter() - t0)
            except FedrgError as err:
                log.error("%s failed at this hospital: %s", action, err)
                out = _pack({"ok": False, "public": err.public_message(), "detail": str(err)},
                            {"reply": Payload(), "state": Payload()})
            except Exception as err:
                log.exception("%s failed at this hospital", action)
                out = _pack({"ok": False, "detail": f"{type(err).__name__} (see the worker log)",
                             "public": f"{type(err).__name__} at the hospital (details in the "
                                       "hospital's log)"},
                            {"reply": Payload(), "state": Payload()})
            with contextlib.suppress(OSError):
                local_socket.send_frame(conn, out)

    def close(self) -> None:
        """Stop listening; remove the socket and the key."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
            for path in (self.address, self.key_file):  # only this worker's own files
                if path is not None:
                    with contextlib.suppress(OSError):
                        path.unlink()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedrg.hospital.worker --site JSON``: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", required=True, help="the hospital's SiteConfig as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        site = SiteConfig.model_validate_json(args.site)
    except ValueError as err:
        print(f"fedrg worker: --site is not a valid site config: {err}", file=sys.stderr)
        return 2
    worker = HospitalWorker(site)
    worker.open()

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        worker.warm_up()
        log.info("hospital worker for %s ready on %s", site.name, worker.address)
        print(f"fedrg worker ready: {site.name}", flush=True)
        while True:
            worker.serve_one()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
