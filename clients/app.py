"""fedrg's Flower ClientApp (the hospital agent) for the deployment engine.

The SuperNode's ``--node-config`` names the cohort, state directory and budget
(``fedrg client`` sets it from the hospital's TOML); nothing else is configured here.
"""

from __future__ import annotations

from fedrg.flower.apps import build_client_app, site_from_node_config

app = build_client_app(site_from_node_config)
