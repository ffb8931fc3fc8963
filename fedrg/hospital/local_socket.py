"""Same-user Unix sockets for the hospital's local services (worker, ClientApp fork server).

A hospital runs two local services next to its SuperNode: the worker
(:mod:`fedrg.hospital.worker`) and the ClientApp fork server
(:mod:`fedrg.deploy.clientapp_forkserver`). What travels on their sockets is secret (patient
model updates; the ClientApp's token, environment and standard streams), so both use this
module, and only this module, for where their sockets live and who may talk on them:

* **Place**: sockets live only in a private directory, ``<state_dir>/sockets``, or, when that
  path is too long for ``AF_UNIX`` (about 107 bytes), a directory made by
  :func:`tempfile.mkdtemp` (unpredictable name, mode 0700) under ``$XDG_RUNTIME_DIR`` or the
  system temp directory, whose path is kept in ``<state_dir>/sockets.dir``. Never a
  predictable name in a shared directory. Every use checks the directory
  (:func:`check_private_dir`): not a symbolic link, owned by this user, no access for group
  or others. Anything else is refused with :class:`UnsafeSocketError`.
* **Peer**: both ends check the other end's user with ``SO_PEERCRED`` (:func:`check_peer`)
  before anything else is sent.
* **Mutual authentication**: a fresh 32-byte key (:func:`write_key`, mode 0600, readable by
  this user only) and an HMAC-SHA256 challenge in both directions. The server proves that it
  knows the key *first*, so a process that is not the hospital's service learns nothing but
  a random nonce: the client sends no request, argument, environment or file descriptor
  until the server has proven itself (:func:`connect`, :func:`authenticate_client`).

The module imports only the standard library and :mod:`fedrg.errors`:
``fedrg.hospital.clientapp_launch`` runs in ``python -I -S`` and loads it from the package
directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedrg.errors import FedrgError

SOCKET_DIR_NAME = "sockets"
POINTER_NAME = "sockets.dir"
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to about 107 bytes
MAX_NAME = 16  # the longest socket file name a service may use in the directory
NONCE_SIZE = 32
KEY_SIZE = 32
HANDSHAKE_TIMEOUT_S = 5.0
_FRAME = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class UnsafeSocketError(FedrgError):
    """A local socket, its directory, its key or its peer failed a check; nothing was sent."""

    def public_message(self) -> str:
        return "UnsafeSocketError: a local service of the hospital failed a security check"


# --------------------------------------------------------------------------- directory

def check_private_dir(path: str | Path, *, uid: int | None = None) -> Path:
    """Return ``path`` if it is a real directory owned by ``uid`` with mode ``0700`` (or less).

    Parameters
    ----------
    path : str or Path
        The socket directory.
    uid : int, optional
        The owner it must have (default: this process's user).

    Raises
    ------
    UnsafeSocketError
        If ``path`` is a symbolic link, not a directory, owned by another user, or open to
        group or others; the message names the directory, what is wrong and the fix.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    uid = os.getuid() if uid is None else uid
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeSocketError(
            f"socket directory {path} is a symbolic link (to {os.readlink(path)}); fedrg uses "
            "only a real directory owned by the hospital's user: remove the link (fedrg "
            "creates the directory itself)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketError(f"socket directory {path} is not a directory; remove it "
                                "(fedrg creates the directory itself)")
    if st.st_uid != uid:
        raise UnsafeSocketError(
            f"socket directory {path} is owned by uid {st.st_uid}, not by the hospital's user "
            f"(uid {uid}); another user may have created it: remove it and start again")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise UnsafeSocketError(
            f"socket directory {path} has mode {mode:04o}: other users could reach the "
            f"hospital's sockets; it must be 0700 (run `chmod 700 {path}`)")
    return path


def _fits(directory: Path) -> bool:
    return len(str(directory / ("x" * MAX_NAME))) <= MAX_SOCKET_PATH


def _read_pointer(pointer: Path) -> Path | None:
    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not text or not os.path.isabs(text) or not _fits(Path(text)):
        raise UnsafeSocketError(
            f"{pointer} does not name a short absolute directory ({text!r}); remove the file "
            "(fedrg makes a new private socket directory)")
    return Path(text)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the worker and the fork server start together
        yield
    finally:
        os.close(fd)


def _private_base() -> str | None:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and _fits(Path(runtime) / "fedrg-XXXXXXXX"):
        with contextlib.suppress(OSError, UnsafeSocketError):
            return str(check_private_dir(runtime))
    return None  # tempfile.mkdtemp's default: the system temp directory


def socket_dir(state_dir: str | Path, *, create: bool = False) -> Path | None:
    """The hospital's private socket directory, checked; ``None`` if it does not exist yet.

    Parameters
    ----------
    state_dir : str or Path
        The hospital's state directory.
    create : bool
        Create the directory (servers do; clients only look).

    Raises
    ------
    UnsafeSocketError
        If the directory exists but fails :func:`check_private_dir`, or cannot be made with a
        path short enough for ``AF_UNIX``.
    """
    state = Path(state_dir).resolve()
    inside = state / SOCKET_DIR_NAME
    if _fits(inside):
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(inside, 0o700)
        elif not os.path.lexists(inside):
            return None
        return check_private_dir(inside)
    # the state directory's path is too long for a socket: a private directory elsewhere,
    # with an unpredictable name kept in <state_dir>/sockets.dir
    pointer = state / POINTER_NAME
    if not create:
        target = _read_pointer(pointer)
        if target is None or not os.path.lexists(target):
            return None
        return check_private_dir(target)
    with _locked(state):
        target = _read_pointer(pointer)
        if target is not None and os.path.lexists(target):
            return check_private_dir(target)
        made = Path(tempfile.mkdtemp(prefix="fedrg-", dir=_private_base()))  # 0700
        if not _fits(made):
            os.rmdir(made)
            raise UnsafeSocketError(
                f"the state directory {state} is too long for a Unix socket and the private "
                f"directory {made} is too: set TMPDIR (or XDG_RUNTIME_DIR) to a short private "
                "directory, or use a shorter state_dir")
        tmp = pointer.with_name(POINTER_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{made}\n")
        os.replace(tmp, pointer)
        return check_private_dir(made)


def socket_path(state_dir: str | Path, name: str, *, create: bool = False) -> Path | None:
    """``<socket_dir(state_dir)>/name``; ``None`` while the directory does not exist."""
    if len(name) > MAX_NAME or "/" in name:
        raise ValueError(f"socket name {name!r}: at most {MAX_NAME} characters, no '/'")
    directory = socket_dir(state_dir, create=create)
    return None if directory is None else directory / name


# --------------------------------------------------------------------------- key

def write_key(path: str | Path) -> bytes:
    """Write a fresh random key to ``path`` (mode 0600, replaced atomically) and return it."""
    path = Path(path)
    key = os.urandom(KEY_SIZE)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    os.replace(tmp, path)
    return key


def read_key(path: str | Path) -> bytes | None:
    """The key in ``path``; ``None`` if there is none (no server has started).

    Raises
    ------
    UnsafeSocketError
        If ``path`` is a link, not a regular file, owned by another user, readable by group
        or others, or not a key fedrg wrote.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO cannot block
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeSocketError(f"key file {path} is a symbolic link; remove it") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or mode & 0o077:
            raise UnsafeSocketError(
                f"key file {path} (mode {mode:04o}, uid {st.st_uid}) must be a regular file of "
                f"uid {os.getuid()} with mode 0600; remove it and restart `fedrg client`")
        key = fh.read(KEY_SIZE + 1)
    if len(key) != KEY_SIZE:
        raise UnsafeSocketError(f"key file {path} holds {len(key)} bytes, not a fedrg key of "
                                f"{KEY_SIZE}; remove it and restart `fedrg client`")
    return key


# --------------------------------------------------------------------------- peer and frames

def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of the Unix socket ``sock``."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(creds)
    return int(uid)


def check_peer(sock: socket.socket, *, uid: int | None = None, where: str = "") -> None:
    """Raise :class:`UnsafeSocketError` unless the peer of ``sock`` runs as ``uid``.

    ``uid`` defaults to this process's user; ``where`` names the socket in the message.
    """
    expected = os.getuid() if uid is None else uid
    actual = peer_uid(sock)
    if actual != expected:
        raise UnsafeSocketError(
            f"the process at the other end of {where or 'a local socket'} runs as uid "
            f"{actual}, not as the hospital's user (uid {expected}); refused, nothing sent")


def send_frame(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` with a 4-byte length prefix."""
    if len(data) > 0xFFFFFFFF:
        raise ValueError(f"local socket message of {len(data)} bytes is larger than 4 GiB")
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, max_size: int) -> bytes:
    """Receive one message of :func:`send_frame` (at most ``max_size`` bytes)."""
    (size,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if size > max_size:
        raise ValueError(f"local socket message of {size} bytes (at most {max_size} expected)")
    return _recv_exact(sock, size)


# --------------------------------------------------------------------------- handshake

def _recv_32(sock: socket.socket) -> bytes:
    data = recv_frame(sock, NONCE_SIZE)
    if len(data) != NONCE_SIZE:
        raise ValueError(f"a handshake message of {len(data)} bytes, not {NONCE_SIZE}")
    return data


def _proof(key: bytes, purpose: str, role: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    msg = b"fedrg-local-socket\x00" + purpose.encode() + b"\x00" + role + nonce_s + nonce_c
    return hmac.new(key, msg, hashlib.sha256).digest()


def authenticate_client(conn: socket.socket, key: bytes, *, purpose: str,
                        timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Server side: check the peer's user, prove the key, and check the client's proof.

    Raises
    ------
    UnsafeSocketError
        If the peer is another user, or does not prove that it knows ``key``.
    """
    conn.settimeout(timeout)
    check_peer(conn, where=f"the {purpose} socket")
    nonce_s = os.urandom(NONCE_SIZE)
    try:
        send_frame(conn, nonce_s)
        nonce_c = _recv_32(conn)
        send_frame(conn, _proof(key, purpose, b"server", nonce_s, nonce_c))
        proof_c = _recv_32(conn)
    except (OSError, EOFError, ValueError) as err:
        raise UnsafeSocketError(f"a client of the {purpose} did not complete the "
                                f"authentication: {err}") from None
    if not hmac.compare_digest(proof_c, _proof(key, purpose, b"client", nonce_s, nonce_c)):
        raise UnsafeSocketError(f"a client of the {purpose} does not know its key; refused")


def connect(address: str | Path, key: bytes, *, purpose: str,
            timeout: float = HANDSHAKE_TIMEOUT_S) -> socket.socket:
    """Client side: connect, check the server's user, and authenticate both ways.

    Nothing but a random nonce is sent before the server has proven that it knows ``key``.

    Raises
    ------
    FileNotFoundError, ConnectionRefusedError
        If nothing listens at ``address`` (no server: the caller may do without).
    UnsafeSocketError
        If the listener is another user, does not know ``key``, or breaks off the handshake.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(address))
        check_peer(sock, where=str(address))
        try:
            nonce_s = _recv_32(sock)
            nonce_c = os.urandom(NONCE_SIZE)
            send_frame(sock, nonce_c)
            proof_s = _recv_32(sock)
        except (OSError, EOFError, ValueError) as err:
            raise UnsafeSocketError(
                f"the process listening on {address} broke off the authentication ({err}); "
                f"refused, nothing sent") from None
        if not hmac.compare_digest(proof_s, _proof(key, purpose, b"server", nonce_s, nonce_c)):
            raise UnsafeSocketError(
                f"the process listening on {address} does not know the {purpose}'s key: it is "
                "not this hospital's service; refused, nothing sent")
        send_frame(sock, _proof(key, purpose, b"client", nonce_s, nonce_c))
    except BaseException:
        sock.close()
        raise
    return sock


def listen(address: Path, key_file: Path, *, what: str,
           backlog: int = 16) -> tuple[socket.socket, bytes]:
    """Write a fresh key to ``key_file`` and listen on ``address`` (mode 0600).

    The socket file of a stopped server is replaced; the key is written only once no other
    server listens (a running server keeps its key).

    Returns
    -------
    (socket.socket, bytes)
        The listening socket and the key clients must prove.

    Raises
    ------
    FedrgError
        If a server already listens on ``address`` (``what`` names it in the message).
    """
    if os.path.lexists(address):
        if not stat.S_ISSOCK(os.lstat(address).st_mode):
            raise UnsafeSocketError(f"{address} exists and is not a socket; remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(address))
        except OSError:  # nobody listens: a stopped server's socket
            address.unlink()
        else:
            raise FedrgError(f"a {what} already listens on {address}; stop that `fedrg "
                             "client` first (one per hospital)")
        finally:
            probe.close()
    key = write_key(key_file)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        sock.bind(str(address))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(address, 0o600)
    sock.listen(backlog)
    return sock, key
