"""Registry credentials and the distribution auth flow.

Credentials come from ``--user USER[:PASSWORD]`` or from the docker CLI's config
(``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``: ``auths`` entries with a
base64 ``auth`` or ``username``/``password``). Credential helpers are not run.

:class:`RegistryAuth` answers a 401's ``WWW-Authenticate`` challenge: ``Basic`` sends the
credentials; ``Bearer realm=...,service=...,scope=...`` gets a token from the realm
(anonymously, or with the credentials as basic auth) and retries with it. Tokens are kept
per registry and sent up front afterwards, so a request whose body cannot be replayed (an
upload stream) is only sent once the flow has run on a cheaper request.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import threading
from collections.abc import Generator

import httpx

from ..errors import InvalidArgument

__all__ = ["Credentials", "RegistryAuth", "docker_config_credentials", "parse_challenge"]


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def _config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _host_of(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``: docker writes auths keys
    with or without a scheme and path."""
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def docker_config_credentials(host: str, path: str | None = None) -> Credentials | None:
    """The credentials for ``host`` in the docker config, or None. A config that does not
    parse is InvalidArgument (naming the file), never silently anonymous."""
    path = path or _config_path()
    try:
        with open(path, "rb") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"docker config {path}: {exc}") from None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {host}
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        wanted |= {"docker.io", "registry-1.docker.io", "index.docker.io"}
    for key, entry in auths.items():
        if _host_of(key) not in wanted or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument(f"docker config {path}: auth for {key}: not base64"
                                      " of USER:PASSWORD") from None
            if not sep:
                raise InvalidArgument(f"docker config {path}: auth for {key}: no ':'")
            return Credentials(user, password)
        if entry.get("username"):
            return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> (``bearer``, {realm: x, service: y})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class AuthFailed(Exception):
    """The registry or its token service refused the credentials (raised with the
    response that said so)."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class RegistryAuth(httpx.Auth):
    """httpx auth flow for one registry (thread-safe: one instance per client)."""

    def __init__(self, credentials: Credentials | None, token_client: httpx.Client) -> None:
        self.credentials = credentials
        self._token_client = token_client
        self._lock = threading.Lock()
        self._header: str | None = None  # what to send up front, once a challenge was met
        self._scopes: set[str] = set()

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        with self._lock:
            header = self._header
        if header and "Authorization" not in request.headers:
            request.headers["Authorization"] = header
        response = yield request
        if response.status_code != 401:
            return
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                return
            new = self.credentials.basic()
        elif scheme == "bearer" and params.get("realm"):
            new = self._token(params)
        else:
            return
        if new == header:
            return  # the same answer failed already: let the 401 through
        with self._lock:
            self._header = new
        request.headers["Authorization"] = new
        yield request

    def _token(self, params: dict[str, str]) -> str:
        with self._lock:
            if params.get("scope"):
                self._scopes.update(params["scope"].split(" "))
            scopes = sorted(self._scopes)
        query: list[tuple[str, str | int | float | bool | None]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query += [("scope", s) for s in scopes]
        headers = {}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
        resp = self._token_client.get(params["realm"], params=query, headers=headers)
        if resp.status_code in (401, 403):
            raise AuthFailed(resp)
        resp.raise_for_status()
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not token:
            raise AuthFailed(resp)
        return f"Bearer {token}"
