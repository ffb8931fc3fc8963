"""``fedrg roster make`` / ``fedrg roster show``: the federation roster (secure aggregation).

The operator collects each hospital's public key files (``fedrg keys new`` writes
``ledger_ed25519.pub`` and ``node_auth.pub``), makes the roster, and publishes it; every
hospital pins the file (``roster = ...`` in its TOML) after checking its digest with its
peers out of band.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedrg.errors import FedrgError

console = Console()
roster_app = typer.Typer(help="The federation roster that secure aggregation trusts.",
                         no_args_is_help=True)


@roster_app.command("make")
def make(
    hospital: list[str] = typer.Option(..., "--hospital", help="NAME=KEYDIR: the directory "
                                       "`fedrg keys new` wrote for that hospital (its public "
                                       "files ledger_ed25519.pub and node_auth.pub)"),
    out: Path = typer.Option(..., "--out", help="roster file to write (TOML)"),
) -> None:
    """Write the roster from the hospitals' public key files."""
    from fedrg.commands.output import check_output_file, fail
    from fedrg.secagg.roster import Roster, entry_from_files, write_roster

    try:
        check_output_file(out, option="--out")
        entries = []
        for item in hospital:
            name, sep, keydir = item.partition("=")
            if not sep or not name or not keydir:
                raise FedrgError(f"--hospital {item!r}: expected NAME=KEYDIR")
            d = Path(keydir)
            node = d / "node_auth.pub"
            entries.append(entry_from_files(name, d / "ledger_ed25519.pub",
                                            node if node.is_file() else None))
        roster = Roster(entries, source=str(out))
        write_roster(out, roster)
    except FedrgError as err:
        fail(err)
    console.print(f"wrote {out}: {len(roster)} hospitals; digest {roster.digest()} "
                  "(hospitals compare it out of band before pinning the file)")


@roster_app.command("show")
def show(path: Path = typer.Argument(..., help="roster file")) -> None:
    """List a roster's hospitals and print its digest."""
    from fedrg.commands.output import fail
    from fedrg.secagg.roster import load_roster

    try:
        roster = load_roster(path)
    except FedrgError as err:
        fail(err)
    for name in roster.names:
        e = roster.entries[name]
        console.print(f"{name}  signing key {e.signing_key.hex()[:16]}…  "
                      f"node key {'yes' if e.node_public_key else 'none'}")
    console.print(f"digest {roster.digest()}")


def register(app: typer.Typer) -> None:
    """Add ``roster``."""
    app.add_typer(roster_app, name="roster")
