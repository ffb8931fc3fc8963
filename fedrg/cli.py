"""The ``fedrg`` command. Sits on top of every layer; commands live in fedrg/commands/."""

from __future__ import annotations

import importlib

import typer

from fedrg.commands.output import FedrgGroup
from fedrg.runtime import apply_offline_env

app = typer.Typer(
    name="fedrg",
    cls=FedrgGroup,  # a file-system error a command let through: one line, exit 2
    help="Privacy-preserving federated learning for radiogenomics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per command group; each owns its commands via register(app).
COMMAND_MODULES = [
    "fedrg.commands.data",  # synth, validate
    "fedrg.commands.importing",  # import (GDC + DICOM)
    "fedrg.commands.model",  # train, predict
    "fedrg.commands.public_adapter",  # public-adapter (install, rebuild, verify)
    "fedrg.commands.federation",  # simulate
    "fedrg.commands.deploy",  # certs, keys, server, client
    "fedrg.commands.audit",  # audit
    "fedrg.commands.roster",  # roster (secure aggregation peers)
    "fedrg.commands.site",  # site reinit, site key
]


def _version(value: bool) -> None:
    if value:
        from fedrg import __version__

        typer.echo(f"fedrg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print fedrg's version (every site must run the same one)"),
) -> None:
    """Privacy-preserving federated learning for radiogenomics."""
    # The fedrg command owns its process: offline, no telemetry, set before any command
    # imports flwr/transformers (importing fedrg.cli itself changes nothing). One callback
    # only: a second @app.callback() replaces the first.
    apply_offline_env()


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
