"""Code pinning: a hospital runs only the app bundle (FAB) it approved.

The server sends its Flower app as a FAB (a zip archive). Before Flower installs or imports
anything from it, the hospital's own ClientApp launcher (:mod:`fedrg.deploy.pinned_clientapp`)
calls :func:`check_fab`, which compares the bundle with what the hospital approved:

- every file in the bundle (except ``pyproject.toml`` and Flower's ``.info/`` manifest)
  must be one of the approved files, byte for byte (SHA-256); no file may be missing or
  added;
- the bundle's ``pyproject.toml`` must name the approved ClientApp
  (``[tool.flwr.app.components] clientapp``) and the hospital's fedrg version
  (``[project] version``);
- when the hospital TOML pins an ``[app] digest``, the bundle's :func:`app_digest` must
  equal it.

By default the approved files are the thin Flower entry points of the hospital's **own
installed fedrg** (``server/*.py`` and ``clients/*.py``, the files ``fab-include`` ships),
so a hospital that installed a release approves exactly that release's app.

This module has no Flower imports: it reads the zip archive itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from fedrg.errors import DeployError

APP_PACKAGES = ("server", "clients")
CLIENTAPP_REF = "clients.app:app"
PIN_FILE = "app-pin.json"
_UNPINNED = ("pyproject.toml",)
_MAX_FAB_BYTES = 16 * 1024 * 1024


class AppNotApprovedError(DeployError):
    """The server's app bundle is not the one this hospital approved; nothing of it ran."""


@dataclass(frozen=True)
class AppPin:
    """What a hospital approved: file hashes, ClientApp reference, fedrg version, digest."""

    files: dict[str, str]
    version: str
    clientapp: str = CLIENTAPP_REF
    digest: str = ""  # '' = no explicit digest pin (the file hashes decide)

    def to_json(self) -> str:
        """The pin as JSON (written to the hospital's state directory)."""
        return json.dumps({"files": self.files, "version": self.version,
                           "clientapp": self.clientapp, "digest": self.digest},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AppPin:
        """Read a pin written by :meth:`to_json`."""
        obj = json.loads(text)
        return cls(files=dict(obj["files"]), version=str(obj["version"]),
                   clientapp=str(obj.get("clientapp", CLIENTAPP_REF)),
                   digest=str(obj.get("digest", "")))


@dataclass
class BundleDiff:
    """How a bundle differs from the pin (empty lists: it matches)."""

    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.added or self.missing or self.other)

    def describe(self) -> str:
        """One readable line per difference."""
        lines = [f"file {c}" for c in self.changed]
        lines += [f"file {a} is not part of the approved app" for a in self.added]
        lines += [f"file {m} of the approved app is missing" for m in self.missing]
        lines += self.other
        return "; ".join(lines)


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def installed_app_files(root: Path | None = None) -> dict[str, str]:
    """SHA-256 of every ``server/*.py`` and ``clients/*.py`` of the installed fedrg app.

    Parameters
    ----------
    root : Path, optional
        Directory holding ``server/`` and ``clients/``; default: where Python imports the
        ``clients`` package from (the hospital's installed fedrg).

    Raises
    ------
    DeployError
        The packages cannot be found.
    """
    if root is None:
        import clients

        root = Path(clients.__file__).resolve().parent.parent
    files: dict[str, str] = {}
    for pkg in APP_PACKAGES:
        d = root / pkg
        if not d.is_dir():
            raise DeployError(f"cannot find fedrg's {pkg}/ package under {root}; reinstall "
                              "fedrg (pip install .) so the approved app files exist")
        for f in sorted(d.glob("*.py")):
            files[f"{pkg}/{f.name}"] = sha256_hex(f.read_bytes())
    return files


def installed_pin(*, digest: str = "", root: Path | None = None) -> AppPin:
    """The pin of this installation: its app files, its fedrg version, and ``digest``."""
    from fedrg import __version__

    return AppPin(files=installed_app_files(root), version=__version__, digest=digest)


def read_fab(content: bytes) -> dict[str, bytes]:
    """The files of a FAB (zip archive) by path.

    Raises
    ------
    AppNotApprovedError
        Not a zip archive, too large, or with unsafe paths.
    """
    if len(content) > _MAX_FAB_BYTES:
        raise AppNotApprovedError(f"the server's app bundle is {len(content)} bytes, more than "
                                  f"fedrg's thin app could ever be ({_MAX_FAB_BYTES})")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            out: dict[str, bytes] = {}
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = info.filename
                if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                    raise AppNotApprovedError(f"the server's app bundle holds an unsafe path "
                                              f"{name!r}")
                out[name] = zf.read(info)
            return out
    except zipfile.BadZipFile as err:
        raise AppNotApprovedError(f"the server's app bundle is not a valid FAB ({err})") from None


def app_digest(files: Mapping[str, str], *, clientapp: str, version: str) -> str:
    """One SHA-256 over the pinned parts of an app: file hashes, ClientApp, version.

    ``fedrg client`` prints the digest of the installed app; a hospital can pin it as
    ``[app] digest`` in its TOML.
    """
    lines = [f"{path}\0{h}" for path, h in sorted(files.items())]
    lines += [f"clientapp\0{clientapp}", f"version\0{version}"]
    return sha256_hex("\n".join(lines).encode())


def pin_digest(pin: AppPin) -> str:
    """:func:`app_digest` of a pin's files, ClientApp and version."""
    return app_digest(pin.files, clientapp=pin.clientapp, version=pin.version)


def _bundle_meta(files: Mapping[str, bytes]) -> tuple[str, str]:
    raw = files.get("pyproject.toml")
    if raw is None:
        raise AppNotApprovedError("the server's app bundle has no pyproject.toml")
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise AppNotApprovedError(f"the bundle's pyproject.toml cannot be read ({err})") from None
    version = str(doc.get("project", {}).get("version", ""))
    comps = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return version, str(comps.get("clientapp", ""))


def diff_fab(content: bytes, pin: AppPin) -> tuple[BundleDiff, str]:
    """Compare a FAB with a pin; returns the differences and the bundle's digest."""
    files = read_fab(content)
    version, clientapp = _bundle_meta(files)
    code = {p: sha256_hex(b) for p, b in files.items()
            if p not in _UNPINNED and not p.startswith(".info/")}
    diff = BundleDiff()
    for path in sorted(set(code) | set(pin.files)):
        if path not in pin.files:
            diff.added.append(path)
        elif path not in code:
            diff.missing.append(path)
        elif code[path] != pin.files[path]:
            diff.changed.append(f"{path} differs (bundle sha256 {code[path][:16]}..., approved "
                                f"{pin.files[path][:16]}...)")
    if clientapp != pin.clientapp:
        diff.other.append(f"the bundle's ClientApp is {clientapp!r}, approved {pin.clientapp!r}")
    if version != pin.version:
        diff.other.append(
            f"the server runs fedrg {version or '(no version)'} and this hospital runs fedrg "
            f"{pin.version}: every site must install the same fedrg version "
            "(compare `fedrg --version`)")
    digest = app_digest(code, clientapp=clientapp, version=version)
    if pin.digest and digest != pin.digest:
        diff.other.append(f"the bundle's app digest {digest} is not the pinned [app] digest "
                          f"{pin.digest}")
    return diff, digest


def check_fab(content: bytes, pin: AppPin) -> str:
    """Refuse a FAB that is not the approved app; return its digest when it is.

    Parameters
    ----------
    content : bytes
        The FAB as the SuperNode received it.
    pin : AppPin
        What this hospital approved (:func:`installed_pin`, or its TOML's ``[app] digest``).

    Raises
    ------
    AppNotApprovedError
        Naming every difference (changed, added or missing files, ClientApp, fedrg version,
        digest). Raised before any file of the bundle is written or imported.
    """
    diff, digest = diff_fab(content, pin)
    if not diff.ok:
        raise AppNotApprovedError(
            "refused the server's app bundle: it is not the app this hospital approved ("
            + diff.describe() + "). Nothing from it ran. If the operator updated fedrg, "
            "install the same release here; otherwise tell the operator")
    return digest
