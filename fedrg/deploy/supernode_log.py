"""Reading a SuperNode's log: connected, gave up, and what a failure means (with the fix)."""

from __future__ import annotations

import re
import time

from fedrg.deploy.flwr_cli import strip_ansi
from fedrg.deploy.supervise import ManagedProcess, ProcessGroup
from fedrg.errors import DeployError

CONNECTED_MARK = "SuperNode ID:"
GAVE_UP_MARK = "Giving up reconnection"
LEDGER_SENT_MARK = "Sending: evaluate.ledger message"  # the reply to a run's last message
RETRY_MARK = "Connection attempt failed"


def server_gone_after_run(log: str) -> bool:
    """True when the SuperNode could not reach the server after answering a run's last
    message (the public ledger copy): the server ended the run and shut down."""
    sent = log.rfind(LEDGER_SENT_MARK)
    return sent != -1 and log.find(RETRY_MARK, sent) != -1


def connection_lost(log: str) -> bool:
    """True when a SuperNode that had connected later gave up reconnecting.

    Flower 1.42's SuperNode logs this and then keeps running without a connection, so the
    caller has to stop it.
    """
    connected = log.find(CONNECTED_MARK)
    return connected != -1 and log.find(GAVE_UP_MARK, connected) != -1


def explain_supernode_failure(log: str, returncode: int | None, *, superlink: str) -> str:
    """Turn a SuperNode's log into a message that says what went wrong and the fix."""
    text = strip_ansi(log)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        detail = ""
        m = re.search(r"certificate verify failed: ([^(\n]+)", text)
        if m:
            detail = f" ({m.group(1).strip()})"
        return (
            f"TLS: the server at {superlink} presented a certificate that the configured CA "
            f"certificate does not vouch for{detail}. Use the federation's ca.crt as "
            "tls.root_certificates, and check that the server address matches a name in the "
            "server certificate"
        )
    if "Failed to activate SuperNode" in text or "[code: 2004]" in text:
        return (
            f"the server at {superlink} refused this hospital's node key (not registered). "
            "Send node_auth.pub (from `fedrg keys new`) to the federation operator and ask "
            "them to add it to the server's allowed hospitals; check that auth.private_key is "
            "the matching node_auth file"
        )
    if "Exit Code: 302" in text:
        return "the node authentication key cannot be read: use node_auth from `fedrg keys new`"
    if "Exit Code: 305" in text or returncode == 305:
        m = re.search(r"Failed to initialize the connection to the SuperLink\.\n([^\n]+)", text)
        why = m.group(1).strip() if m else "no connection"
        return (
            f"cannot reach the server at {superlink} ({why}). Check server.address and the "
            "port, that the server runs, and that the firewall lets this machine reach it"
        )
    return (
        f"the SuperNode stopped (exit status {returncode}); last log lines:\n"
        + "\n".join(text.splitlines()[-15:])
    )


def wait_supernode_connected(
    proc: ManagedProcess, *, superlink: str, timeout: float, group: ProcessGroup | None = None,
) -> float:
    """Wait until the SuperNode has been accepted by the SuperLink (``SuperNode ID:`` in its log).

    Raises
    ------
    DeployError
        With :func:`explain_supernode_failure`'s message when the SuperNode exits, or an
        unreachable-server message after ``timeout``.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        text = proc.log_text()
        if CONNECTED_MARK in text:
            if group is not None:
                group.refresh()
            return time.monotonic() - start
        if not proc.alive():
            raise DeployError(explain_supernode_failure(text, proc.returncode(),
                                                        superlink=superlink))
        time.sleep(0.25)
    raise DeployError(
        f"no answer from the server at {superlink} within {timeout:.0f} s. Check "
        f"server.address, that the server runs, and the firewall; log {proc.log_path}:\n"
        + proc.log_tail(10)
    )
