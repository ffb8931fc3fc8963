"""Start, watch and stop Flower's processes (SuperLink, SuperNodes, the ``flwr`` CLI).

The work is split along its three jobs; this module keeps the old import names working:

* :mod:`fedrg.deploy.supervise`: process groups, start, readiness of a process, stop;
* :mod:`fedrg.deploy.flwr_cli`: the environment and command lines of Flower's programs and
  the ``flwr`` CLI (register a node, stage and submit the app, wait for a run);
* :mod:`fedrg.deploy.supernode_log`: reading a SuperNode's log (connected, gave up, why).

None of them imports ``flwr``: they launch Flower's command-line programs.
"""

from __future__ import annotations

from fedrg.deploy.flwr_cli import (
    CONNECTION_NAME,
    TELEMETRY_OFF,
    TlsFiles,
    _json_tail,
    _toml_value,
    flower_bin,
    flower_env,
    format_address,
    free_port,
    node_config_arg,
    register_supernode,
    run_flwr,
    run_status,
    stage_app,
    strip_ansi,
    submit_run,
    superlink_argv,
    supernode_argv,
    wait_http_ready,
    wait_run,
    write_flwr_config,
    write_run_config,
)
from fedrg.deploy.supernode_log import (
    CONNECTED_MARK,
    GAVE_UP_MARK,
    connection_lost,
    explain_supernode_failure,
    wait_supernode_connected,
)
from fedrg.deploy.supervise import (
    ManagedProcess,
    ProcessGroup,
    _descendants,
    _die_with_parent,
    _same_running,
    _signal_group,
    _signal_proc,
)

__all__ = [
    "CONNECTED_MARK",
    "CONNECTION_NAME",
    "GAVE_UP_MARK",
    "TELEMETRY_OFF",
    "ManagedProcess",
    "ProcessGroup",
    "TlsFiles",
    "connection_lost",
    "explain_supernode_failure",
    "flower_bin",
    "flower_env",
    "format_address",
    "free_port",
    "node_config_arg",
    "register_supernode",
    "run_flwr",
    "run_status",
    "stage_app",
    "strip_ansi",
    "submit_run",
    "superlink_argv",
    "supernode_argv",
    "wait_http_ready",
    "wait_run",
    "wait_supernode_connected",
    "write_flwr_config",
    "write_run_config",
]

# private helpers kept importable under their old module (tests and callers used them)
_PRIVATE = (_json_tail, _toml_value, _descendants, _die_with_parent, _same_running,
            _signal_group, _signal_proc)
