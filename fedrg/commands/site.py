"""``fedrg site``: a hospital's own state (re-initialise a wiped ledger, show its key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from fedrg.errors import FedrgError

site_app = typer.Typer(help="A hospital's own state: ledger re-initialisation and its key.",
                       no_args_is_help=True)


def _site(config: Path | None, state_dir: Path | None, name: str | None,
          signing_key: Path | None) -> Any:
    from fedrg.config import SiteConfig

    if config is not None:
        from fedrg.deploy.settings import load_hospital_settings

        site = load_hospital_settings(config).site
        updates: dict[str, Any] = {}
        if state_dir is not None:
            updates["state_dir"] = str(state_dir)
        if name is not None:
            updates["name"] = name
        return site.model_copy(update=updates) if updates else site
    if state_dir is None or name is None:
        raise FedrgError("give --config HOSPITAL_TOML, or both --state-dir DIR and --name NAME")
    return SiteConfig(name=name, cohort="", state_dir=str(state_dir),
                      signing_key=str(signing_key) if signing_key else "")


def _previous_head(path: Path | None, name: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FedrgError(f"--previous-head {path}: cannot read a JSON head ({err})") from None
    if isinstance(obj, dict) and "entries" in obj:
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("heads"), dict):
        obj = obj["heads"]  # a server's RUN_DIR/ledger_heads.json
    if isinstance(obj, dict) and isinstance(obj.get(name), dict):
        return obj[name]
    raise FedrgError(f"--previous-head {path} holds no ledger head for hospital {name!r} "
                     "(give the server's ledger_heads.json or one head object)")


@site_app.command("reinit")
def reinit(
    reason: str = typer.Option(..., "--reason", help="why (recorded in the ledger, shown by "
                               "`fedrg audit`)"),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="the hospital's state "
                                          "directory (a fresh one)"),
    name: str | None = typer.Option(None, "--name", help="the hospital (site) name"),
    config: Path | None = typer.Option(None, "--config", help="the hospital's TOML (fedrg "
                                       "client settings): name, state_dir and policy"),
    signing_key: Path | None = typer.Option(None, "--signing-key", help="Ed25519 key "
                                            "(default: STATE_DIR/ledger_ed25519.pem)"),
    previous_head: Path | None = typer.Option(
        None, "--previous-head", help="the last head of the old ledger, if known (the "
        "server's RUN_DIR/ledger_heads.json, or one head)"),
) -> None:
    """Start a fresh ledger with a signed re-initialisation entry.

    A hospital whose state directory was wiped refuses to train while a server remembers
    its old ledger; this records, signed, that the lifetime budget restarts here and why.
    """
    from fedrg.commands.output import check_output_dir, fail
    from fedrg.privacy.ledger import Ledger

    try:
        site = _site(config, state_dir, name, signing_key)
    except FedrgError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    try:
        check_output_dir(site.state_dir, option="--state-dir" if state_dir is not None
                         else f"state_dir in {config}")
    except FedrgError as err:
        fail(err)
    try:
        head = _previous_head(previous_head, site.name)
        ledger = Ledger.open(site.state_dir, hospital=site.name,
                             signing_key_path=site.signing_key or None)
        policy = site.policy
        entry = ledger.reinitialise(
            reason=reason, previous_head=head, policy_hash=policy.policy_hash(),
            accountant=policy.accountant,
            target_delta=policy.target_delta if policy.target_delta is not None else 1e-5,
            budget=policy.epsilon_budget)
    except FedrgError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    named = (f"previous head: {head.get('entries')} entries, key {head.get('key_id')}"
             if head else "previous head unknown")
    typer.echo(f"{site.name}: ledger {ledger.path} re-initialised (entry {entry.seq}, "
               f"{named}); `fedrg audit` shows it")


@site_app.command("key")
def key(
    state_dir: Path = typer.Option(..., "--state-dir", help="the hospital's state directory"),
    name: str = typer.Option(..., "--name", help="the hospital (site) name"),
) -> None:
    """Print the hospital's key-registry line for auditors (`fedrg audit --keys`)."""
    from fedrg import signing
    from fedrg.audit.key_registry import registry_entry

    try:
        pub = signing.load_public_key(Path(state_dir) / signing.PUBLIC_KEY_NAME)
    except FedrgError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(registry_entry(name, pub))


def register(app: typer.Typer) -> None:
    """Add ``fedrg site ...`` to ``app``."""
    app.add_typer(site_app, name="site")
