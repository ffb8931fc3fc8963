"""The one formatter for pydantic validation errors (configs, site configs, deploy settings).

Each error becomes one line naming the key (dotted path), the value and what is wrong; an
unknown key lists the keys allowed at that place, so a typo shows its fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["format_validation_error"]


def _section_of(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def format_validation_error(err: ValidationError, what: str, *, root: type[BaseModel] | None = None,
                            prefix: tuple[str, ...] = (),
                            locate: Callable[[str], str] | None = None) -> str:
    """A readable, multi-line message for ``err``.

    Parameters
    ----------
    err
        The pydantic error.
    what
        What was validated, e.g. ``"configuration (exp.toml)"`` or ``"settings file x.toml"``.
    root
        The validated model; an unknown key then lists the keys allowed in its section.
    prefix
        Leading key parts to show (e.g. ``("site",)`` for a ``[site]`` table).
    locate
        Maps the dotted key to the name the user wrote (e.g. ``site.policy.x`` -> ``policy.x``
        when the policy is a ``[policy]`` table of its own).

    Returns
    -------
    str
        ``"invalid WHAT:\\n  line\\n  line"``.
    """
    lines = []
    for e in err.errors():
        loc_t = tuple(e["loc"])
        loc = ".".join(str(p) for p in (*prefix, *loc_t))
        if locate is not None:
            loc = locate(loc)
        if e["type"] == "extra_forbidden":
            section = _section_of(root, loc_t[:-1]) if root is not None else None
            allowed = ", ".join(sorted(section.model_fields)) if section else "see the documented keys"
            lines.append(f"unknown key '{loc}'; allowed keys here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"missing key '{loc}'")
        else:
            lines.append(f"'{loc}' = {e.get('input')!r}: {e['msg']}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)
