"""fedrg: privacy-preserving federated learning for radiogenomics.

Importing fedrg (or any of its modules) has no side effects on the host process: it sets
no environment variables and leaves torch's thread count alone. The ``fedrg`` command and
the Flower app modules switch to offline mode themselves (:mod:`fedrg.runtime`).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
