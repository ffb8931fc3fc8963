"""``fedrg public-adapter``: install, rebuild or verify the public initial adapter."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from fedrg.errors import FedrgError


def public_adapter(
    config: Path | None = typer.Option(None, "--config", help="experiment TOML"),
    set_: list[str] | None = typer.Option(None, "--set", help="section.key=value override"),
    rebuild: bool = typer.Option(False, "--rebuild", help="pre-train it from the recipe here "
                                 "(minutes of CPU), replacing the cached copy; the shipped copy "
                                 "is not used"),
    verify: bool = typer.Option(False, "--verify", help="rebuild it from the recipe in a "
                                "temporary folder and compare with the shipped copy (exit 1 "
                                "if they differ)"),
    ship: bool = typer.Option(False, "--ship", hidden=True, help="maintainers: after --rebuild, "
                              "write it into the package's shipped adapters"),
) -> None:
    """Prepare the public initial adapter of this configuration (model.public_init =
    'synthetic'): install the shipped copy after checking its SHA-256, or build it."""
    from fedrg.commands.output import fail
    from fedrg.commands.progress import phase
    from fedrg.config import load_config
    from fedrg.model.base import load_base
    from fedrg.paths import cache_dir
    from fedrg.train.public_init import (
        DEFAULT_RECIPE,
        META_FILE,
        build_public_init,
        cache_key,
        ensure_public_init,
    )
    from fedrg.train.shipped import compare_with_shipped, shipped_manifest
    from fedrg.train.shipped import ship as ship_adapter

    console = Console(highlight=False)
    try:
        if ship and not rebuild:
            raise FedrgError("--ship writes what --rebuild built: give both")
        if rebuild and verify:
            raise FedrgError("--rebuild and --verify: give one (--verify rebuilds into a "
                             "temporary folder and leaves the cache as it is)")
        cfg = load_config(config, set_ or [])
        key = cache_key(cfg.model, cfg.data, training_cfg=cfg.training)
        if verify:
            shipped = shipped_manifest(key)
            if shipped is None:
                raise FedrgError(f"no shipped public adapter for key {key} (this configuration); "
                                 "fedrg ships one for the default configuration only")
            load_base(cfg.model.base)
            with tempfile.TemporaryDirectory(prefix="fedrg-public-adapter-") as tmp:
                with phase(console, f"rebuilding public adapter {key} from its recipe") as step:
                    build_public_init(cfg.model, cfg.data, cfg.training,
                                      recipe=DEFAULT_RECIPE, directory=Path(tmp),
                                      progress=step)
                result = compare_with_shipped(Path(tmp), shipped)
            console.print(json.dumps({"key": key, **result}, indent=1))
            if not result["identical"]:
                console.print(f"the rebuilt adapter differs from the shipped one (largest "
                              f"absolute difference {result['max_abs_diff']}); shipped by "
                              f"{result['shipped_built_by']}, rebuilt by {result['rebuilt_by']}")
                raise typer.Exit(1)
            console.print("the rebuilt adapter is byte-identical to the shipped one")
            return
        load_base(cfg.model.base)
        root = cache_dir() / "public-init"
        if rebuild and (root / key).exists():
            shutil.rmtree(root / key)
        with phase(console, "preparing the public initial adapter") as step:
            directory = ensure_public_init(cfg.model, cfg.data, cfg.training, progress=step,
                                           use_shipped=not rebuild)
        meta = json.loads((directory / META_FILE).read_text())
        console.print(f"public adapter {key}: {directory} ({meta.get('source', 'built here')})")
        if ship:
            shipped_now = ship_adapter(directory)
            console.print(f"shipped as {shipped_now.arrays} (sha256 {shipped_now.sha256})")
    except FedrgError as err:
        fail(err)


def register(app: typer.Typer) -> None:
    """Add ``public-adapter`` to ``app``."""
    app.command("public-adapter")(public_adapter)
