"""Error types. Every fedrg error derives from :class:`FedrgError`.

Messages name the setting or file, the value, and the fix. Nothing that may leave a
site (an error sent to the server) carries patient identifiers, paths or sample values:
use :meth:`FedrgError.public_message` for that.
"""

from __future__ import annotations

from dataclasses import dataclass


class FedrgError(Exception):
    """Root of all fedrg errors."""

    def public_message(self) -> str:
        """Message safe to send off-site (no paths, ids or values)."""
        return type(self).__name__


class ConfigError(FedrgError):
    """A configuration value or file is invalid."""


@dataclass(frozen=True)
class Problem:
    """One problem found in a cohort, pointing at a file and (optionally) a row."""

    file: str
    message: str
    row: int | None = None

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}, row {self.row}"
        return f"{where}: {self.message}"


class CohortError(FedrgError):
    """A cohort directory is invalid. ``problems`` lists every problem found."""

    def __init__(self, cohort: str, problems: list[Problem]):
        self.cohort = cohort
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cohort {cohort} has {len(self.problems)} problem(s):\n{lines}")

    def public_message(self) -> str:
        return f"CohortError: local cohort invalid ({len(self.problems)} problem(s))"


class ImageReadError(FedrgError):
    """An image file cannot be read (missing, truncated, corrupt or unsupported)."""


class PrivacyError(FedrgError):
    """A privacy setting is unsafe or inconsistent."""


class BudgetExceededError(PrivacyError):
    """Training would push a dataset's cumulative epsilon past its lifetime budget."""

    def __init__(self, *, epsilon_spent: float, epsilon_after: float, budget: float):
        self.epsilon_spent = epsilon_spent
        self.epsilon_after = epsilon_after
        self.budget = budget
        super().__init__(
            f"privacy budget would be exceeded: spent epsilon={epsilon_spent:.4f}, "
            f"after this round {epsilon_after:.4f} > budget {budget:.4f}; "
            "raise the site's epsilon_budget or stop training on this dataset"
        )

    def public_message(self) -> str:
        # the epsilon the refused round would reach depends on the cohort size: it stays on site
        return (f"privacy budget would be exceeded: spent epsilon={self.epsilon_spent:.4f} of "
                f"budget {self.budget:.4f}, and the requested round does not fit in what is "
                "left; raise the site's epsilon_budget or stop training on this dataset")


class PolicyViolationError(PrivacyError):
    """A server request falls outside the hospital's own privacy policy.

    ``setting`` names the requested setting, ``requested`` its value and ``allowed`` the range
    the site's policy accepts. The message carries no patient data, so it may be sent to the
    server as a typed refusal.
    """

    def __init__(self, *, setting: str, requested: object, allowed: str):
        self.setting = setting
        self.requested = requested
        self.allowed = allowed
        super().__init__(
            f"request refused by the site policy: {setting}={requested!r} is outside the "
            f"allowed range ({allowed}); change the experiment request or the site's [policy]"
        )

    def public_message(self) -> str:
        return str(self)


class LedgerError(PrivacyError):
    """A privacy ledger is corrupt, tampered with, or cannot be written."""


class SecAggError(FedrgError):
    """Secure aggregation failed (e.g. fewer survivors than the threshold)."""

    def public_message(self) -> str:
        return str(self)


class ModelError(FedrgError):
    """A base model or adapter cannot be built or loaded."""


class DeployError(FedrgError):
    """A deployment step failed: certificates, keys, or a Flower process."""


class RecordSchemaError(FedrgError):
    """A training record (dataset item or batch) lacks a field its schema requires."""


class DataImportError(FedrgError):
    """An input of ``fedrg import`` (a GDC file or a DICOM folder) is unusable.

    ``problems`` lists every problem found, each naming the file, row/column and the fix.
    """

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot import {source}: {len(self.problems)} problem(s):\n{lines}")
