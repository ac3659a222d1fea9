"""RegistryClient: the OCI distribution HTTP API over httpx, with errors mapped to the
store's classes in one place (:meth:`RegistryClient._check`):

    connection refused, timeouts, 5xx, 429 (after retries)  -> Unavailable
    401, 403 (a message naming the registry and how to log in) -> FailedPrecondition
    404 (manifest or blob unknown)                           -> NotFound
    other 4xx                                                -> InvalidArgument

Idempotent requests (GET, HEAD) are retried with backoff; redirects (to blob storage)
are followed, without the registry's Authorization header when they leave its origin.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Iterable, Iterator
from urllib.parse import urljoin

import httpx

from ..errors import FailedPrecondition, InvalidArgument, NotFound, StoreError, Unavailable
from .auth import AuthFailed, Credentials, RegistryAuth

__all__ = ["MANIFEST_ACCEPT", "RegistryClient"]

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "*/*;q=0.8",
])

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RegistryClient:
    """One registry host. Thread-safe; ``close()`` (or ``with``) releases connections.

    ``retries`` is how many times a failed idempotent request is tried again (backoff
    0.25 s doubling); ``timeout`` bounds connecting and each read.
    """

    def __init__(
        self,
        host: str,
        *,
        plain_http: bool = False,
        skip_verify: bool = False,
        credentials: Credentials | None = None,
        retries: int = 3,
        timeout: float = 30.0,
        connections: int = 8,
    ) -> None:
        self.host = host
        self.retries = retries
        self.base = f"{'http' if plain_http else 'https'}://{host}/v2/"
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        # one TLS context for both clients, from the system's CA store (what the machine's
        # other tools trust; $SSL_CERT_FILE and $SSL_CERT_DIR apply), loaded once
        tls = ssl.create_default_context()
        if skip_verify:
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        self._token_http = httpx.Client(verify=tls, follow_redirects=True, timeout=timeout)
        self._http = httpx.Client(
            verify=tls,
            follow_redirects=True,
            timeout=httpx.Timeout(timeout),
            limits=limits,
            auth=RegistryAuth(credentials, self._token_http),
            headers={"User-Agent": "contentfs/0.1"},
        )

    def close(self) -> None:
        self._http.close()
        self._token_http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # errors -----------------------------------------------------------------------

    def unavailable(self, what: str, detail: str) -> Unavailable:
        """The error for a registry that cannot be reached or answered badly."""
        return Unavailable(f"registry {self.host}: {what}: {detail}")

    def _check(self, resp: httpx.Response, what: str) -> None:
        """Raise the store error for a failed response (its body must be read)."""
        code = resp.status_code
        if code < 400:
            return
        detail = _error_detail(resp)
        if code in (401, 403):
            raise FailedPrecondition(
                f"registry {self.host}: {what}: {'unauthorized' if code == 401 else 'denied'}"
                f" (HTTP {code}{': ' + detail if detail else ''}); give credentials with"
                " --user USER[:PASSWORD] or in ~/.docker/config.json")
        if code == 404:
            raise NotFound(f"{what} on registry {self.host}{' (' + detail + ')' if detail else ''}")
        if code in _RETRY_STATUS or code >= 500:
            raise self.unavailable(what, f"HTTP {code}{': ' + detail if detail else ''}")
        raise InvalidArgument(f"registry {self.host}: {what}: HTTP {code}"
                              f"{': ' + detail if detail else ''}")

    def _auth_failed(self, exc: AuthFailed, what: str) -> StoreError:
        try:
            exc.response.read()
            self._check(exc.response, f"{what}: token service")
        except StoreError as err:
            return err
        return FailedPrecondition(f"registry {self.host}: {what}: the token service gave no"
                                  " token")

    # requests -----------------------------------------------------------------------

    def url(self, path: str) -> str:
        return urljoin(self.base, path)

    @contextlib.contextmanager
    def open(
        self, method: str, path: str, what: str, *, headers: dict[str, str] | None = None,
        ok_missing: bool = False,
    ) -> Iterator[httpx.Response]:
        """Send an idempotent request and yield the streaming response, its status
        checked (404 yielded as is when ``ok_missing``). Connection failures and 5xx
        are retried before anything is yielded."""
        delay = 0.25
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                req = self._http.build_request(method, self.url(path), headers=headers)
                resp = self._http.send(req, stream=True)
            except AuthFailed as exc:
                raise self._auth_failed(exc, what) from None
            except httpx.TransportError as exc:
                if last:
                    raise self.unavailable(what, _transport_detail(exc)) from None
                log.info("registry %s: %s: %s; retrying", self.host, what, exc)
                time.sleep(delay)
                delay *= 2
                continue
            try:
                if resp.status_code in _RETRY_STATUS and not last:
                    resp.read()
                    log.info("registry %s: %s: HTTP %d; retrying", self.host, what,
                             resp.status_code)
                    time.sleep(delay)
                    delay *= 2
                    continue
                if resp.status_code >= 400 and not (ok_missing and resp.status_code == 404):
                    resp.read()
                    self._check(resp, what)
                yield resp
                return
            finally:
                resp.close()

    def get_bytes(self, path: str, what: str, *, accept: str | None = None,
                  limit: int = 8 << 20) -> tuple[bytes, httpx.Headers]:
        """GET a small body (manifests), refusing one over ``limit`` bytes."""
        headers = {"Accept": accept} if accept else None
        with self.open("GET", path, what, headers=headers) as resp:
            chunks: list[bytes] = []
            got = 0
            try:
                for chunk in resp.iter_bytes():
                    got += len(chunk)
                    if got > limit:
                        raise InvalidArgument(f"{what}: larger than {limit} bytes")
                    chunks.append(chunk)
            except httpx.TransportError as exc:
                raise self.unavailable(what, _transport_detail(exc)) from None
            return b"".join(chunks), resp.headers

    def exists(self, path: str, what: str, *, accept: str | None = None) -> bool:
        """HEAD: True for 2xx, False for 404."""
        headers = {"Accept": accept} if accept else None
        with self.open("HEAD", path, what, headers=headers, ok_missing=True) as resp:
            return resp.status_code != 404

    def send(
        self, method: str, path_or_url: str, what: str, *,
        content: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """A non-idempotent request (POST, PUT, PATCH): sent once, status checked.
        An iterable body streams (never held in memory)."""
        try:
            resp = self._http.request(method, self.url(path_or_url), content=content,
                                      headers=headers, params=params)
        except AuthFailed as exc:
            raise self._auth_failed(exc, what) from None
        except httpx.TransportError as exc:
            raise self.unavailable(what, _transport_detail(exc)) from None
        self._check(resp, what)
        return resp

    def ping(self) -> None:
        """GET /v2/ (runs the auth flow once, so later uploads go with a token)."""
        with self.open("GET", "", "ping", ok_missing=True) as resp:
            resp.read()


def _error_detail(resp: httpx.Response) -> str:
    """The first ``errors[].message`` of a distribution error body, else ''."""
    try:
        body = resp.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors and isinstance(errors[0], dict):
            code = errors[0].get("code", "")
            msg = errors[0].get("message", "")
            return f"{code.lower()}: {msg}" if code else str(msg)
    except (ValueError, httpx.ResponseNotRead):
        pass
    return ""


def _transport_detail(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({text})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return text
