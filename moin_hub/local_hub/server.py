"""A Hugging Face Hub-compatible HTTP server on loopback, for offline work and tests.

The real ``huggingface_hub`` client, ``datasets.load_dataset``, ``pandas.read_parquet("hf://...")`` and
``from_pretrained(repo, revision=sha)`` talk to :class:`LocalHub` exactly as they talk to huggingface.co:
only the endpoint differs. It speaks the subset of the Hub's HTTP API those clients use (see
``HUB_EMULATOR.md`` for the contract): repo create/delete/info, preupload, the atomic NDJSON commit
endpoint with ``parentCommit`` (optimistic concurrency: 412 when stale), tree, paths-info, refs, commits,
branches and tags, model/dataset listing with tag filters, card YAML validation, ``whoami-v2`` and
``resolve`` downloads with ``ETag``, ``X-Repo-Commit`` and byte ranges.

Uploads are always "regular" (base64 inside the commit): the server never hands out LFS or Xet uploads,
so nothing leaves the machine. Storage is :class:`moin_hub.local_hub.storage.HubStorage`: content-addressed
blobs, immutable commits and atomically replaced refs under ``data_dir``, so a restarted server sees
everything an earlier one stored.

This module is the HTTP plumbing and :class:`LocalHub`; the routes are in :mod:`~moin_hub.local_hub.api`
and :mod:`~moin_hub.local_hub.uploads`, requests and replies in :mod:`~moin_hub.local_hub.protocol`, card
checks in :mod:`~moin_hub.local_hub.cards` and fault injection in :mod:`~moin_hub.local_hub.faults`.

Example:
    >>> from huggingface_hub import HfApi
    >>> with LocalHub(tmp_path) as hub:
    ...     api = HfApi(endpoint=hub.url)
    ...     api.create_repo("org/demo")
    ...     api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="org/demo")
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from .api import _HubApi, _TokenBook
from .faults import Fault, FaultInjection
from .objects import HubError, RepoKey, check_repo_part
from .protocol import _error_reply, _Reply, _Request
from .storage import HubStorage

logger = logging.getLogger(__name__)

__all__ = ["LocalHub"]

DEFAULT_MAX_BODY_BYTES = 2 * 1024**3
_DRAIN_LIMIT = 16 * 1024**2  # unread request bodies up to this size are drained to keep the connection
_COPY_CHUNK = 1024**2
_STALE_PARENT = "A commit has happened since. Please refresh and try again."


# ====================================================================================================
# HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP/1.1 requests into :class:`_Request` objects and :class:`_Reply` objects into bytes."""

    protocol_version = "HTTP/1.1"
    server_version = "moin-hub-local/1"
    timeout = 300  # seconds an idle keep-alive connection may wait for its next request
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- one request ----------------------------------------------------------------------------------

    def _handle(self) -> None:
        hub: LocalHub = self.server.hub
        self._body: bytes | None = None
        started = time.monotonic()
        fault = hub._take_fault(self.command, self.path)
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            hub._record(self.command, self.path, None)
            return
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "status":
            reply = _error_reply(HubError(fault.status, f"Injected fault: HTTP {fault.status}"))
        else:
            reply = self._route(hub)
        if fault is not None and fault.kind == "drop_after":  # the work is done, the answer is lost
            self.close_connection = True
            hub._record(self.command, self.path, None)
            return
        self._send(reply)
        hub._record(self.command, self.path, reply.status)
        if hub.verbose:
            self.log_message(
                '"%s %s" %s %.1f ms',
                self.command,
                self.path,
                reply.status,
                (time.monotonic() - started) * 1000,
            )

    def _route(self, hub: LocalHub) -> _Reply:
        raw_path, _, raw_query = self.path.partition("?")
        try:
            if not raw_path.startswith("/"):
                raise HubError(400, f"Bad request target {self.path!r}")
            segments = [unquote(part) for part in raw_path.split("/")[1:]]
            if segments and segments[-1] == "" and len(segments) > 1:
                segments.pop()  # tolerate one trailing slash
            if any("\0" in segment for segment in segments):
                raise HubError(400, "NUL characters are not allowed in URLs")
            request = _Request(
                method=self.command,
                segments=segments,
                query=parse_qs(raw_query, keep_blank_values=True),
                headers=self.headers,
                base_url=f"http://{self.headers.get('Host') or hub.host_port}",
                read_body=self._read_body,
            )
            return hub._api.dispatch(request)
        except HubError as exc:
            return _error_reply(exc)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # a bug in this server: say so, keep serving
            logger.exception("LocalHub: internal error on %s %s", self.command, self.path)
            return _error_reply(
                HubError(500, f"Internal error in the local hub: {type(exc).__name__}: {exc}")
            )

    # -- request bodies -------------------------------------------------------------------------------

    def _content_length(self) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            return 0
        if not value.strip().isdigit():
            raise HubError(400, f"Bad Content-Length {value!r}")
        return int(value)

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _read_body(self) -> bytes:
        """The request body (read once, bounded by the hub's ``max_body_bytes``; 413 beyond)."""
        if self._body is not None:
            return self._body
        limit = self.server.hub.max_body_bytes
        if self._is_chunked():
            self._body = self._read_chunked(limit)
            return self._body
        length = self._content_length()
        if length > limit:
            raise HubError(413, f"Request body of {length} bytes exceeds the limit of {limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError("client closed the connection mid-body")
        self._body = body
        return body

    def _read_chunked(self, limit: int) -> bytes:
        chunks, total = [], 0
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise HubError(400, f"Bad chunk size {size_line!r}") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                raise HubError(413, f"Request body exceeds the limit of {limit} bytes")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)  # the CRLF after each chunk

    def _settle_unread_body(self) -> bool:
        """Drain a small unread body so the connection can be reused; ``False`` if it must be closed."""
        if self._body is not None:
            return True
        try:
            if self._is_chunked():
                return False
            length = self._content_length()
        except HubError:
            return False
        if length == 0:
            return True
        if length > _DRAIN_LIMIT:
            return False
        self.rfile.read(length)
        return True

    # -- replies --------------------------------------------------------------------------------------

    def _send(self, reply: _Reply) -> None:
        keep_alive = self._settle_unread_body()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(reply.length))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if not keep_alive:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        if reply.file is None:
            self.wfile.write(reply.body)
            return
        path, offset, length = reply.file
        with open(path, "rb") as handle:
            handle.seek(offset)
            while length > 0:
                chunk = handle.read(min(_COPY_CHUNK, length))
                if not chunk:
                    raise ConnectionError(f"blob {path} is shorter than recorded")
                self.wfile.write(chunk)
                length -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):  # the client went away: nothing to answer
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server that remembers its open connections so :meth:`LocalHub.stop` can close them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: LocalHub):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler crash through :mod:`logging` instead of printing a traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            logger.debug("LocalHub: connection from %s ended: %r", client_address, exc)
        else:
            logger.exception("LocalHub: error while serving %s", client_address)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            (self._connections.add if add else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ====================================================================================================
# The public class


class LocalHub(FaultInjection):
    """A Hugging Face Hub-compatible server on loopback, storing repos under ``data_dir``.

    Args:
        data_dir: where blobs, commits and refs live; a new hub on the same folder sees all of them.
        host: interface to bind (``"127.0.0.1"``; use ``"0.0.0.0"`` to serve other machines).
        port: TCP port; ``0`` picks a free one (read it back from :attr:`url`).
        tokens: optional write tokens, ``{namespace: token}`` (a token may also be a list of tokens).
            Once a namespace has a token, creating, deleting and committing to its repos need
            ``Authorization: Bearer <token>`` (401 without, 403 with a wrong one) and its private repos
            are visible only with it. Public reads stay open.
        verbose: log one line per request on stderr.
        max_body_bytes: largest request body accepted (413 beyond).

    Example:
        >>> from huggingface_hub import HfApi, hf_hub_download
        >>> with LocalHub(tmp_path, tokens={"org": "secret"}) as hub:
        ...     api = HfApi(endpoint=hub.url, token="secret")
        ...     api.create_repo("org/demo")
        ...     info = api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="org/demo")
        ...     path = hf_hub_download("org/demo", "a.txt", revision=info.oid, endpoint=hub.url)
    """

    def __init__(
        self,
        data_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: dict[str, str | Iterable[str]] | None = None,
        *,
        verbose: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        self.storage = HubStorage(data_dir)
        self.data_dir = self.storage.root
        self.host = host
        self.port = port
        self.verbose = verbose
        self.max_body_bytes = max_body_bytes
        #: The last requests served, as ``(method, raw path, status or None for a dropped one)``.
        self.request_log: deque[tuple[str, str, int | None]] = deque(maxlen=10_000)
        self._tokens = _TokenBook()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._api = _HubApi(self.storage, self._tokens)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        for namespace, token in (tokens or {}).items():
            for one in [token] if isinstance(token, str) else token:
                self.add_token(namespace, one)

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: pass it as ``endpoint=`` or ``HF_ENDPOINT``.

        Raises:
            RuntimeError: before :meth:`start` / :meth:`serve_forever` bound the port.
        """
        if self._server is None:
            raise RuntimeError("LocalHub is not started: call start() first")
        return f"http://{self.host_port}"

    @property
    def host_port(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{host}:{self.port}"

    def _bind(self) -> _Server:
        if self._server is not None:
            raise RuntimeError(f"LocalHub already serving at {self.url}")
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        return self._server

    def start(self) -> LocalHub:
        """Serve in a background daemon thread and return ``self`` (so ``hub = LocalHub(d).start()``)."""
        server = self._bind()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits at most this long for the loop to notice
            name=f"LocalHub:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the foreground until Ctrl+C (for the ``moin-hub local-hub`` command)."""
        server = self._bind()
        print(
            f"Local Hub serving {self.data_dir} at {self.url} (Ctrl+C to stop)", file=sys.stderr, flush=True
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving, close open connections and release the port (safe to call twice)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._close()

    def _close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.server_close()
            server.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server else "not started"
        return f"LocalHub({str(self.data_dir)!r}, {where})"

    # -- direct access (tests) ------------------------------------------------------------------------

    def blob_path(self, repo_id: str, revision: str, path: str, repo_type: str = "model") -> Path:
        """The file on disk that holds ``path`` of ``repo_id`` at ``revision``.

        Meant for tests that simulate a broken or compromised server: blobs are shared by content, so
        overwriting this file changes what every commit holding the same content serves (and the
        served bytes then no longer match their ``ETag``). Restore it afterwards.

        Raises:
            LookupError: the repo, revision or file does not exist.

        Example:
            >>> blob = hub.blob_path("org/demo", "main", "a.txt")
            >>> original = blob.read_bytes()
        """
        namespace, _, name = repo_id.partition("/")
        try:
            commit = self.storage.resolve(RepoKey(repo_type, namespace, name), revision)
        except HubError as exc:
            raise LookupError(exc.message) from None
        if path not in commit.tree:
            raise LookupError(f"No file '{path}' in {repo_type} repo '{repo_id}' at {revision}")
        return self.storage.blob_path(commit.tree[path].oid)

    # -- tokens ---------------------------------------------------------------------------------------

    def add_token(self, namespace: str, token: str) -> None:
        """Require ``token`` (or another token added for it) to write into ``namespace`` from now on.

        Raises:
            ValueError: empty token or invalid namespace.
        """
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"token must be a non-empty string, got {token!r}")
        try:
            check_repo_part(namespace, "namespace")
        except HubError as exc:
            raise ValueError(exc.message) from None
        self._tokens.add(namespace, token)

    # -- request log ----------------------------------------------------------------------------------

    def _record(self, method: str, target: str, status: int | None) -> None:
        self.request_log.append((method, target, status))
