"""Settings of a deployment: the server's TOML and a hospital's TOML (pydantic, extra="forbid").

Relative paths in a settings file are resolved against the directory of that file, so a
command works the same from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedrg.config import SiteConfig, policy_table_key, read_toml, site_table
from fedrg.errors import ConfigError
from fedrg.policy import SitePolicy, encode_policy
from fedrg.pydantic_errors import format_validation_error


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- server

class SuperLinkSection(_Section):
    """Where the SuperLink listens.

    ``host:port`` is the hospitals' listener: it serves only Flower's Fleet API (SuperNodes).
    The operator's API (``flwr run``, node registration, run and node listings) and the
    ServerApp's Runtime API listen on ``127.0.0.1:operator_port`` only.
    """

    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 accepts the network")
    port: int = Field(9092, ge=1, le=65535)
    operator_port: int = Field(
        0, ge=0, le=65535,
        description="loopback port of the operator's Control/Runtime API (0 = any free port)",
    )
    database: str = Field("", description="SuperLink state file ('' = in memory)")
    ready_timeout_s: float = Field(60.0, gt=0)


class ServerTlsSection(_Section):
    """The SuperLink's certificate (from ``fedrg certs init``)."""

    ca_cert: str = "certs/ca.crt"
    server_cert: str = "certs/server.pem"
    server_key: str = "certs/server.key"


class AllowedHospital(_Section):
    """A hospital allowed to join: its name, node public key (``node_auth.pub``) and the
    ``min_secagg_peers`` its published policy requires (the server waits for that many
    other hospitals; the hospital's own policy still decides)."""

    name: str = Field(..., min_length=1)
    public_key: str
    min_secagg_peers: int = Field(
        SitePolicy.model_fields["min_secagg_peers"].default, ge=1,
        description="the hospital's published policy.min_secagg_peers (default: the policy's)")


class ServerAuthSection(_Section):
    """SuperNode authentication: only registered hospital keys may connect."""

    hospitals: list[AllowedHospital] = Field(default_factory=list)


class RunSection(_Section):
    """The fedrg run the server launches once the SuperLink is up."""

    app_dir: str = Field("", description="Flower app directory ('' = the installed fedrg app)")
    experiment: str = Field("", description="experiment TOML (configs/*.toml); '' = defaults")
    overrides: list[str] = Field(default_factory=list, description="section.key=value")
    run_dir: str = Field("runs/deploy", description="checkpoints, metrics, final adapter")
    timeout_s: float = Field(24 * 3600.0, gt=0, description="give up on the run after this")
    wait_for_hospitals_s: float = Field(
        3600.0, gt=0, description="how long a round waits for the hospitals the run needs")
    keep_running: bool = Field(False, description="keep the SuperLink up after the run")


class ServerSettings(_Section):
    """``fedrg server --config F``."""

    superlink: SuperLinkSection = Field(default_factory=SuperLinkSection)
    tls: ServerTlsSection = Field(default_factory=ServerTlsSection)
    auth: ServerAuthSection = Field(default_factory=ServerAuthSection)
    run: RunSection = Field(default_factory=RunSection)
    state_dir: str = Field("server-state", description="logs and the private FLWR_HOME")


# --------------------------------------------------------------------------- hospital

class HospitalServerSection(_Section):
    """How this hospital reaches the federation's SuperLink."""

    address: str = Field(..., description="host:port of the SuperLink")
    root_certificates: str = Field("certs/ca.crt", description="the federation's ca.crt")
    connect_timeout_s: float = Field(60.0, gt=0, description="give up connecting after this")

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or "://" in v:
            raise ValueError(
                f"server.address={v!r} must be host:port without a URL prefix, "
                "e.g. 'fl.example.org:9092' or '[::1]:9092'"
            )
        return v


class HospitalAuthSection(_Section):
    """This hospital's node-authentication key (from ``fedrg keys new``)."""

    private_key: str = "keys/node_auth"


class SupernodeSection(_Section):
    """The local SuperNode's own runtime API (where its ClientApp processes connect)."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = any free port")


class HospitalAppSection(_Section):
    """Which app code this hospital runs (see :mod:`fedrg.deploy.pinning`).

    The hospital always refuses an app bundle whose files are not those of its own
    installed fedrg, or that comes from another fedrg version. ``digest`` pins in addition
    one reviewed release's app digest (``fedrg client`` prints the installed one).
    """

    digest: str = Field("", description="pinned app digest (64 hex digits; '' = no extra pin)")

    @field_validator("digest")
    @classmethod
    def _hex64(cls, v: str) -> str:
        v = v.strip().lower()
        if v and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
            raise ValueError(f"app.digest={v!r} must be 64 hex digits (the digest `fedrg "
                             "client` prints as 'approved app ... digest'), or '' for none")
        return v


class WorkerSection(_Section):
    """The hospital worker that trains and evaluates (:mod:`fedrg.hospital.worker`)."""

    threads: int = Field(
        0, ge=0, description="its torch/OpenMP threads (0 = torch's default: every core); "
        "give each hospital a share when several run on one machine")


class HospitalSettings(_Section):
    """``fedrg client --config F``."""

    site: SiteConfig
    server: HospitalServerSection
    auth: HospitalAuthSection = Field(default_factory=HospitalAuthSection)
    supernode: SupernodeSection = Field(default_factory=SupernodeSection)
    app: HospitalAppSection = Field(default_factory=HospitalAppSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    experiment: str = Field(
        "", description="the federation's experiment TOML, for the data settings the cohort "
        "is validated against ('' = defaults)",
    )


# --------------------------------------------------------------------------- loading

def _resolve(base: Path, value: str) -> str:
    if not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _validate(model: type[BaseModel], data: dict[str, Any], path: Path) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"settings file {path}", root=model,
                                                  locate=policy_table_key)) from None


def load_server_settings(path: str | Path) -> ServerSettings:
    """Read ``fedrg server``'s TOML; relative paths become absolute (relative to the file)."""
    p = Path(path)
    s: ServerSettings = _validate(ServerSettings, read_toml(p), p)
    base = p.resolve().parent
    s.superlink.database = _resolve(base, s.superlink.database)
    for key in ("ca_cert", "server_cert", "server_key"):
        setattr(s.tls, key, _resolve(base, getattr(s.tls, key)))
    for h in s.auth.hospitals:
        h.public_key = _resolve(base, h.public_key)
    s.run.app_dir = _resolve(base, s.run.app_dir)
    s.run.experiment = _resolve(base, s.run.experiment)
    s.run.run_dir = _resolve(base, s.run.run_dir)
    s.state_dir = _resolve(base, s.state_dir)
    names = [h.name for h in s.auth.hospitals]
    if len(set(names)) != len(names):
        raise ConfigError(f"{p}: auth.hospitals names must be unique, got {names}")
    return s


def load_hospital_settings(path: str | Path) -> HospitalSettings:
    """Read ``fedrg client``'s TOML; relative paths become absolute (relative to the file)."""
    p = Path(path)
    data = read_toml(p)
    data["site"] = site_table(data, str(p))
    data.pop("policy", None)
    s: HospitalSettings = _validate(HospitalSettings, data, p)
    base = p.resolve().parent
    site = s.site.model_dump()
    for key in ("cohort", "state_dir", "signing_key", "roster"):
        site[key] = _resolve(base, site[key])
    s.site = SiteConfig.model_validate(site)
    s.server.root_certificates = _resolve(base, s.server.root_certificates)
    s.auth.private_key = _resolve(base, s.auth.private_key)
    s.experiment = _resolve(base, s.experiment)
    return s


def node_config(site: SiteConfig) -> dict[str, str | float]:
    """The SuperNode's ``--node-config`` for a site, in the keys the ClientApp reads.

    Keys (read by :func:`fedrg.flower.apps.site_from_node_config`): ``site-name``,
    ``cohort``, ``state-dir``, ``signing-key``, ``roster`` and ``policy`` (:func:`encode_policy`).
    These stay on the hospital's machine: the SuperNode never sends its node config to the server.
    """
    return {
        "site-name": site.name,
        "cohort": site.cohort,
        "state-dir": site.state_dir,
        "signing-key": site.signing_key,
        "roster": site.roster,
        "policy": encode_policy(site.policy),
    }
