"""A network guard for the test suite: no connection to any host but this machine.

The tests talk to the local Hub on 127.0.0.1 only. A stray look-up of another host (PEFT's
``save_pretrained(save_embedding_layers="auto")`` fetching the base model's config from huggingface.co,
telemetry, a download the code forgot to point at ``--endpoint``) is recorded and refused: the name
resolution (``socket.getaddrinfo``) and the TCP connection (``socket.socket.connect``) both fail with an
``OSError``, as they would offline. Refusing is not enough, since libraries catch such errors and go on
with a warning; so every attempt is also recorded, and the suite's autouse fixture ``no_network``
(``tests/conftest.py``) fails the test that made one.

Child processes: ``tests/netguard_site/sitecustomize.py`` installs the same guard in every Python started
with that folder on ``PYTHONPATH`` (the conftest puts it there), and they append their attempts to the file
named by ``MOIN_NETGUARD_LOG``, which the fixture reads too.

Allowed: loopback addresses, ``localhost``, this machine's own host name and interface addresses (Ray
names its node by them), Unix sockets, and datagram sockets (a UDP ``connect`` sends nothing; Ray uses
one to learn the node's address). Refused but not recorded: :data:`THIRD_PARTY_PROBES`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import traceback

LOG_ENV = "MOIN_NETGUARD_LOG"

_real_getaddrinfo = socket.getaddrinfo
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex

#: Probes of third-party infrastructure that no setting turns off, refused but not held against a test:
#: Ray's dashboard asks the cloud metadata service (169.254.169.254, metadata.google.internal) which cloud it
#: runs on, even with usage stats disabled (``ray/_common/usage/usage_lib.py``).
THIRD_PARTY_PROBES = (os.path.join("ray", "_common", "usage", "usage_lib.py"),)

_attempts: list[str] = []
_own: set[str] | None = None


def _own_names() -> set[str]:
    global _own
    if _own is None:
        names = {"localhost", "localhost.localdomain", socket.gethostname(), socket.getfqdn()}
        for name in list(names):
            try:
                names.update(info[4][0] for info in _real_getaddrinfo(name, None))
            except OSError:
                pass
        try:  # the addresses of this machine's interfaces (Ray's node address is one)
            import psutil

            names.update(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                         if a.family in (socket.AF_INET, socket.AF_INET6))
        except ImportError:
            pass
        _own = {n.split("%")[0].lower() for n in names if n}
    return _own


def allowed(host: object) -> bool:
    """Whether the tests may reach ``host`` (a name or an address)."""
    if host is None:
        return True  # getaddrinfo(None, port): a local wildcard address
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0].lower()
    if host in ("", "0.0.0.0", "::"):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    return host in _own_names()


def _record(what: str) -> None:
    frames = traceback.extract_stack()[:-2]
    if any(probe in frame.filename for frame in frames for probe in THIRD_PARTY_PROBES):
        return
    stack = "".join(traceback.format_list(frames[-40:]))
    entry = f"{what} (pid {os.getpid()})\n{stack}"
    _attempts.append(entry)
    log = os.environ.get(LOG_ENV)
    if log:
        try:
            with open(log, "a", encoding="utf-8") as f:
                f.write(entry.replace("\n", "\n    ") + "\n")
        except OSError:
            pass


def _guarded_getaddrinfo(host, port, *args, **kwargs):  # noqa: ANN001, ANN202
    if not allowed(host):
        _record(f"name lookup of {host!r} (port {port})")
        raise socket.gaierror(socket.EAI_NONAME, f"moin-hub tests: no network beyond this machine ({host})")
    return _real_getaddrinfo(host, port, *args, **kwargs)


def _refused(sock: socket.socket, address: object) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return False
    host = address[0] if isinstance(address, tuple) and address else address
    if allowed(host):
        return False
    _record(f"TCP connection to {address!r}")
    return True


def _guarded_connect(self, address):  # noqa: ANN001, ANN202
    if _refused(self, address):
        raise ConnectionRefusedError(f"moin-hub tests: no network beyond this machine ({address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):  # noqa: ANN001, ANN202
    if _refused(self, address):
        import errno

        return errno.ECONNREFUSED
    return _real_connect_ex(self, address)


def install() -> None:
    """Guard this process (idempotent)."""
    socket.getaddrinfo = _guarded_getaddrinfo
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex


def take() -> list[str]:
    """The attempts recorded since the last call, in this process and (from the log file) in children."""
    found = list(_attempts)
    _attempts.clear()
    log = os.environ.get(LOG_ENV)
    if log and os.path.exists(log):
        with open(log, "r+", encoding="utf-8") as f:
            text = f.read()
            f.seek(0)
            f.truncate()
        pid = f"(pid {os.getpid()})"
        entries: list[str] = []
        for line in text.splitlines():
            if line.startswith(" ") and entries:
                entries[-1] += "\n" + line
            elif line:
                entries.append(line)
        found += [f"in a child process: {entry}" for entry in entries if pid not in entry.split("\n", 1)[0]]
    return found
