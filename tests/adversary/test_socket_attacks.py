"""Another local user against the hospital's local sockets (issue 23, item 3).

The hospital's ClientApp launcher (the ``flwr-clientapp`` that ``fedrg client`` writes) hands
the fork server Flower's ClientAppIo token (in argv), its whole environment and its standard
streams; the worker socket carries model updates. On main 2f5b27c, a state directory with a
long path put both sockets at a predictable ``/tmp/fedrg-<service>-<hash>.sock``: another
local user who bound that path first received all of it, and the launcher exited 0 on the
squatter's word although the pinned ClientApp never ran.

- test_attack_socket_squatter: a real squatter (a thread on a real Unix socket) holds the
  old predictable paths, then impersonates the fork server where the launcher now connects;
  it receives no argument, environment variable or file descriptor, and the launch fails
  with a message naming the socket and the reason.
- the worker socket, a wrong peer uid (a socketpair and a forged expected uid; as root also a
  real process of user ``nobody``), an open, foreign-owned or symlinked socket directory and
  a readable key file are refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedrg.config import SiteConfig
from fedrg.deploy.clientapp_forkserver import ForkServer
from fedrg.deploy.pinned_clientapp import write_launcher
from fedrg.deploy.pinning import installed_pin
from fedrg.errors import FedrgError
from fedrg.hospital import clientapp_launch, local_socket
from fedrg.hospital.worker import KEY_NAME as WORKER_KEY
from fedrg.hospital.worker import HospitalWorker, WorkerError, forward
from fedrg.hospital.worker import socket_path as worker_socket_path
from fedrg.payload import Payload
from fedrg.policy import SitePolicy

ROOT = Path(__file__).resolve().parents[2]
BANNER = b"squatter was here"
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def old_predictable_path(state: Path, service: str) -> Path:
    """Where main 2f5b27c put a socket when the state directory's path was too long."""
    digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedrg-{service}-{digest}.sock"


class Squatter:
    """A listener on ``path`` that records everything it is sent, file descriptors included.

    ``impostor=False`` speaks the old fork-server protocol (read the request, write on the
    launcher's stdout, answer a pid and exit status 0). ``impostor=True`` plays the server's
    part of the new handshake without the key (a nonce, then a forged proof) and then records
    whatever still arrives.
    """

    def __init__(self, path: Path, *, impostor: bool = False) -> None:
        self.path, self.impostor = path, impostor
        self.received = b""
        self.fds = 0
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _take(self, conn: socket.socket) -> bytes:
        msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 21, 8)
        self.received += msg
        self.fds += len(fds)
        if len(fds) > 1:
            os.write(fds[1], BANNER + b"\n")  # the launcher's own stdout, handed over
        for fd in fds:
            os.close(fd)
        return msg

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            with conn:
                conn.settimeout(10)
                try:
                    if self.impostor:
                        local_socket.send_frame(conn, os.urandom(32))
                    self._take(conn)
                    if self.impostor:
                        local_socket.send_frame(conn, os.urandom(32))  # a forged proof
                        while self._take(conn):
                            pass
                    conn.sendall(b"4242\n")
                    threading.Event().wait(0.3)
                    conn.sendall(b"0\n")  # "the ClientApp exited 0"
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _launch(state: Path, *args: str, env_secret: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOSPITAL_SECRET=env_secret, FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([str(state / "bin" / "flwr-clientapp"), *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture
def long_state(tmp_path: Path) -> Iterator[Path]:
    """A hospital state directory whose path is too long for a Unix socket inside it."""
    state = tmp_path / ("a-long-hospital-directory-name-" * 4) / "state"
    state.mkdir(parents=True, mode=0o700)
    assert len(str(state / "clientapp.sock")) > 107
    write_launcher(state, installed_pin())
    yield state
    pointer = state / local_socket.POINTER_NAME
    if pointer.is_file():  # the private directory made outside tmp_path
        shutil.rmtree(pointer.read_text().strip(), ignore_errors=True)


def test_attack_socket_squatter(long_state: Path):
    token, secret = f"TOKEN-{uuid.uuid4().hex}", uuid.uuid4().hex
    # 1. Before any fork server runs, another user binds the paths main 2f5b27c used.
    squatters = [Squatter(old_predictable_path(long_state, s)) for s in ("clientapp", "worker")]
    try:
        res = _launch(long_state, "--token", token, "--help", env_secret=secret)
    finally:
        for sq in squatters:
            sq.close()
    for sq in squatters:
        assert sq.connections == 0 and sq.received == b"" and sq.fds == 0, (
            f"the squatter on {sq.path} received {len(sq.received)} bytes and {sq.fds} file "
            f"descriptors (token in them: {token.encode() in sq.received})")
    # the launcher found no fork server of its own and ran the pinned ClientApp itself
    assert res.returncode == 0 and "usage: flwr-clientapp" in res.stdout
    assert BANNER.decode() not in res.stdout

    # 2. An impostor without the key listens where the launcher connects now (the private
    #    directory a fork server made, with that server's key still on disk).
    address = clientapp_launch.socket_path(long_state, create=True)
    assert address is not None and not str(address).startswith(
        str(old_predictable_path(long_state, "clientapp").parent / "fedrg-clientapp-"))
    local_socket.write_key(clientapp_launch.key_path(long_state))
    impostor = Squatter(address, impostor=True)
    try:
        res = _launch(long_state, "--token", token, "--help", env_secret=secret)
    finally:
        impostor.close()
    assert impostor.connections == 1
    assert len(impostor.received) == 4 + local_socket.NONCE_SIZE  # the launcher's nonce only
    assert token.encode() not in impostor.received and secret.encode() not in impostor.received
    assert impostor.fds == 0
    # loud: non-zero, naming the socket and the reason; not the impostor's "exit 0"
    assert res.returncode == clientapp_launch.EXIT_REFUSED
    assert str(address) in res.stderr and "does not know" in res.stderr
    assert BANNER.decode() not in res.stdout and "usage:" not in res.stdout


def _site(state: Path) -> SiteConfig:
    return SiteConfig(name="h1", cohort=str(state.parent / "cohort"), state_dir=str(state),
                      policy=SitePolicy(epsilon_budget=5.0, epsilon_per_run=5.0))


def test_attack_worker_socket_impostor_gets_nothing(long_state: Path):
    site = _site(long_state)
    address = worker_socket_path(long_state, create=True)
    assert address is not None
    local_socket.write_key(long_state / WORKER_KEY)
    impostor = Squatter(address, impostor=True)
    secret = uuid.uuid4().hex
    try:
        with pytest.raises(WorkerError, match="does not know"):
            forward(site, "ledger", Payload(meta={"secret": secret}), Payload())
    finally:
        impostor.close()
    assert impostor.connections == 1
    assert len(impostor.received) == 4 + local_socket.NONCE_SIZE
    assert secret.encode() not in impostor.received


def test_wrong_peer_uid_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        local_socket.check_peer(a)  # the real peer: this user
        assert local_socket.peer_uid(a) == os.getuid()
        with pytest.raises(local_socket.UnsafeSocketError,
                           match=f"runs as uid {os.getuid()}, not as the hospital's user "
                                 f"\\(uid {os.getuid() + 1}\\)"):
            local_socket.check_peer(a, uid=os.getuid() + 1, where="the test socket")


_OTHER_USER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if sys.argv[1] == "listen":
    s.bind(sys.argv[2]); s.listen(1); print("ready", flush=True)
    c, _ = s.accept()
else:
    s.connect(sys.argv[2]); print("ready", flush=True); c = s
c.settimeout(10)
got = b""
try:
    while chunk := c.recv(4096):
        got += chunk
except OSError:
    pass
print(len(got), flush=True)
"""


def _as_nobody(mode: str, path: Path) -> subprocess.Popen:
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = subprocess.Popen([python, "-I", "-c", _OTHER_USER, mode, str(path)],
                            stdout=subprocess.PIPE, text=True, user=NOBODY, group=NOBODY)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@as_root
def test_listener_of_another_user_is_refused_before_anything_is_sent():
    shared = Path(tempfile.mkdtemp())
    os.chown(shared, NOBODY, NOBODY)
    try:
        proc = _as_nobody("listen", shared / "clientapp.sock")
        with pytest.raises(local_socket.UnsafeSocketError, match=f"runs as uid {NOBODY}"):
            local_socket.connect(shared / "clientapp.sock", os.urandom(32), purpose="test")
        out, _ = proc.communicate(timeout=30)
        assert out.strip() == "0"  # it received nothing at all
    finally:
        shutil.rmtree(shared)


@as_root
def test_client_of_another_user_is_refused_before_anything_is_sent():
    shared = Path(tempfile.mkdtemp())
    os.chmod(shared, 0o755)
    try:
        sock, key = local_socket.listen(shared / "x.sock", shared / "x.key", what="test server")
        os.chmod(shared / "x.sock", 0o777)  # reachable by anyone: only the peer check is left
        with sock:
            proc = _as_nobody("connect", shared / "x.sock")
            conn, _ = sock.accept()
            with conn, pytest.raises(local_socket.UnsafeSocketError,
                                     match=f"runs as uid {NOBODY}"):
                local_socket.authenticate_client(conn, key, purpose="test")
            out, _ = proc.communicate(timeout=30)
        assert out.strip() == "0"  # not even the server's nonce
    finally:
        shutil.rmtree(shared)


def test_handshake_needs_the_key_on_both_sides(tmp_path: Path):
    directory = local_socket.socket_dir(tmp_path, create=True)
    assert directory is not None
    sock, key = local_socket.listen(directory / "t.sock", tmp_path / "t.key", what="test")
    outcomes: list[str] = []

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = sock.accept()
            with conn:
                try:
                    local_socket.authenticate_client(conn, key, purpose="test")
                    local_socket.send_frame(conn, b"hello")
                    outcomes.append("ok")
                except local_socket.UnsafeSocketError as err:
                    outcomes.append(str(err))

    t = threading.Thread(target=serve, args=(3,), daemon=True)
    t.start()
    with sock:
        with pytest.raises(local_socket.UnsafeSocketError, match="does not know"):
            local_socket.connect(directory / "t.sock", os.urandom(32), purpose="test")
        with pytest.raises(local_socket.UnsafeSocketError, match="does not know"):
            local_socket.connect(directory / "t.sock", key, purpose="another service")
        with local_socket.connect(directory / "t.sock", key, purpose="test") as c:
            assert local_socket.recv_frame(c, 16) == b"hello"
        t.join(10)
    assert outcomes[2] == "ok"
    assert all("did not complete the authentication" in o for o in outcomes[:2])


def test_open_socket_directory_is_refused(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    write_launcher(state, installed_pin())
    (state / "sockets").mkdir(mode=0o700)
    (state / "sockets").chmod(0o777)
    for start in (ForkServer(state).open, HospitalWorker(_site(state)).open):
        with pytest.raises(FedrgError, match="mode 0777.*chmod 700"):
            start()
    assert os.listdir(state / "sockets") == []
    res = _launch(state, "--token", "T", "--help", env_secret="s")
    assert res.returncode == clientapp_launch.EXIT_REFUSED
    assert f"{state / 'sockets'} has mode 0777" in res.stderr
    with pytest.raises(WorkerError, match="mode 0777"):
        forward(_site(state), "ledger", Payload(), Payload())


def test_open_private_directory_of_a_long_state_dir_is_refused(long_state: Path):
    made = local_socket.socket_dir(long_state, create=True)
    assert made is not None
    made.chmod(0o777)
    with pytest.raises(FedrgError, match="mode 0777"):
        ForkServer(long_state).open()
    res = _launch(long_state, "--help", env_secret="s")
    assert res.returncode == clientapp_launch.EXIT_REFUSED and str(made) in res.stderr


def test_foreign_owned_socket_directory_is_refused(tmp_path: Path):
    d = tmp_path / "sockets"
    d.mkdir(mode=0o700)
    local_socket.check_private_dir(d)  # ours, 0700: accepted
    with pytest.raises(local_socket.UnsafeSocketError,
                       match=f"owned by uid {os.getuid()}, not by the hospital's user "
                             f"\\(uid {os.getuid() + 1}\\)"):
        local_socket.check_private_dir(d, uid=os.getuid() + 1)


@as_root
def test_socket_directory_of_another_user_is_refused(tmp_path: Path):
    state = tmp_path / "state"
    (state / "sockets").mkdir(parents=True, mode=0o700)
    os.chown(state / "sockets", NOBODY, NOBODY)  # another user made it first
    with pytest.raises(FedrgError, match=f"owned by uid {NOBODY}"):
        ForkServer(state).open()
    with pytest.raises(FedrgError, match=f"owned by uid {NOBODY}"):
        HospitalWorker(_site(state)).open()


def test_symlinked_socket_directory_is_refused(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    write_launcher(state, installed_pin())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)  # ours and private, but reached through a link
    (state / "sockets").symlink_to(elsewhere)
    for start in (ForkServer(state).open, HospitalWorker(_site(state)).open):
        with pytest.raises(FedrgError, match="symbolic link"):
            start()
    assert os.listdir(elsewhere) == []
    res = _launch(state, "--help", env_secret="s")
    assert res.returncode == clientapp_launch.EXIT_REFUSED and "symbolic link" in res.stderr


def test_symlinked_private_directory_of_a_long_state_dir_is_refused(long_state: Path,
                                                                     tmp_path: Path):
    elsewhere = tmp_path / "e"
    elsewhere.mkdir(mode=0o700)
    link = Path(tempfile.mkdtemp()) / "l"
    link.symlink_to(elsewhere)
    try:
        (long_state / local_socket.POINTER_NAME).write_text(f"{link}\n")
        with pytest.raises(FedrgError, match="symbolic link"):
            ForkServer(long_state).open()
    finally:
        shutil.rmtree(link.parent)


def test_long_state_dir_gets_an_unpredictable_private_directory(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    states = [tmp_path / str(i) / ("x" * 120) for i in range(2)]
    made = []
    for state in states:
        state.mkdir(parents=True)
        assert local_socket.socket_dir(state) is None  # clients never create it
        d = local_socket.socket_dir(state, create=True)
        assert d is not None and local_socket.socket_dir(state, create=True) == d  # kept
        assert local_socket.socket_dir(state) == d
        assert (d.stat().st_mode & 0o777) == 0o700 and d.stat().st_uid == os.getuid()
        assert (state / local_socket.POINTER_NAME).stat().st_mode & 0o777 == 0o600
        digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:16]
        assert digest not in str(d)  # not derived from the state path
        made.append(d)
    assert made[0] != made[1] and made[0].parent == made[1].parent == Path(tempfile.gettempdir())
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    third = tmp_path / "2" / ("x" * 120)
    third.mkdir(parents=True)
    d3 = local_socket.socket_dir(third, create=True)
    assert d3 is not None and d3.parent == runtime
    for d in made:
        shutil.rmtree(d)


def test_key_file_must_be_private_and_real(tmp_path: Path):
    key_file = tmp_path / "k.key"
    assert local_socket.read_key(key_file) is None
    key = local_socket.write_key(key_file)
    assert local_socket.read_key(key_file) == key and len(key) == 32
    key_file.chmod(0o644)
    with pytest.raises(local_socket.UnsafeSocketError, match="mode 0644"):
        local_socket.read_key(key_file)
    link = tmp_path / "link.key"
    link.symlink_to(key_file)
    with pytest.raises(local_socket.UnsafeSocketError, match="symbolic link"):
        local_socket.read_key(link)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)  # would block a reader forever
    with pytest.raises(local_socket.UnsafeSocketError, match="must be a regular file"):
        local_socket.read_key(fifo)
