"""The ``fedrg`` command. Sits on top of every layer; commands live in fedrg/commands/."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="fedrg",
    help="Privacy-preserving federated learning for radiogenomics.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per command group; each owns its commands via register(app).
COMMAND_MODULES = [
    "fedrg.commands.data",  # synth, validate
    "fedrg.commands.model",  # train, predict
    "fedrg.commands.federation",  # simulate
    "fedrg.commands.deploy",  # certs, keys, server, client
    "fedrg.commands.audit",  # audit
    "fedrg.commands.site",  # site reinit, site key
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
