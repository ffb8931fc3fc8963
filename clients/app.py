"""fedrg's Flower ClientApp (the hospital agent) for the deployment engine.

The SuperNode's ``--node-config`` names the cohort, state directory and budget
(``fedrg client`` sets it from the hospital's TOML); nothing else is configured here.
"""

from __future__ import annotations

from fedrg.runtime import apply_offline_env

apply_offline_env()  # a Flower app module is fedrg's own process

from fedrg.flower.apps import build_client_app, site_from_node_config  # noqa: E402

app = build_client_app(site_from_node_config)
