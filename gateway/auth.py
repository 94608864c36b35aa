"""Who may call what.

Admin routes: `Authorization: Bearer <auth.admin_token>` (compared in constant time) when a token is set;
with no token set they answer local clients only (403 for anyone else). Local is decided from the socket
peer alone: a loopback address, and no proxy header (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`) on
the request. A reverse proxy on the same host connects from loopback for every client, and uvicorn's
proxy-header support rewrites the peer from `X-Forwarded-For` (from any peer it is told to trust, which
`FORWARDED_ALLOW_IPS=*` makes every peer); a relayed request is never taken for a local one. `serve`
runs uvicorn without proxy headers, and refuses to listen on a non-loopback host with no admin token
unless `auth.insecure_admin` says so (`admin_exposure_problem`).

Inference routes: open until an API key exists (in the config file, or made through /admin/keys; revoking
every key does not open them again), unless `auth.require_api_key` says otherwise. Then a valid key is
required (401: missing, unknown, revoked, `api_key_expired`), and a key may call only the models its
globs match (403); the base model is matched by its own name. Keys are checked by their keyed hash
(gateway/tenancy/keys.py).
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress

from fastapi import Request

from gateway.errors import AuthenticationError, PermissionDeniedError
from gateway.settings import Settings
from gateway.tenancy.keys import KeyEntry, Keyring


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_loopback(request: Request) -> bool:
    """The socket peer is a loopback address (as the ASGI server reports it)."""
    return is_loopback_host(request.client.host if request.client else "")


#: Headers a reverse proxy adds: a request carrying one was relayed, its socket peer is the proxy.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def is_relayed(request: Request) -> bool:
    return any(name in request.headers for name in PROXY_HEADERS)


def is_loopback_host(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    # A dual-stack listener (`--host ::`) sees IPv4 clients as ::ffff:a.b.c.d
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback


def require_admin(request: Request) -> None:
    settings: Settings = request.app.state.gateway.settings
    expected = settings.auth.admin_token
    if expected is None:
        if is_relayed(request):
            raise PermissionDeniedError(
                "Admin routes answer local clients only when no admin token is configured, and this "
                "request was relayed by a proxy (it carries a forwarding header).",
                code="admin_loopback_only",
            )
        if not is_loopback(request):
            raise PermissionDeniedError(
                "Admin routes answer loopback clients only when no admin token is configured.",
                code="admin_loopback_only",
            )
        return
    token = bearer(request)
    if token is None or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise AuthenticationError(
            "A valid admin token is required (Authorization: Bearer ...).", code="invalid_admin_token"
        )


def api_key(request: Request, keyring: Keyring) -> KeyEntry | None:
    """The caller's key; None when inference is open. 401 for a missing, unknown, expired or revoked key."""
    token = bearer(request)
    found = keyring.lookup(token) if token is not None else None
    if found is not None and found.entry is not None:
        return found.entry
    if not keyring.required:  # open: a valid key still names its caller (usage, limits)
        return None
    if found is not None and found.expired:
        raise AuthenticationError("This API key has expired.", code="api_key_expired")
    raise AuthenticationError(
        "Incorrect or missing API key (Authorization: Bearer ...).", code="invalid_api_key"
    )


def may_use(key: KeyEntry | None, model: str) -> bool:
    return key is None or any(fnmatch.fnmatchcase(model, pattern) for pattern in key.models)


def check_model_allowed(key: KeyEntry | None, name: str) -> None:
    if not may_use(key, name):
        raise PermissionDeniedError(f"This API key may not use the model `{name}`.", param="model")


def admin_exposure_problem(settings: Settings) -> str | None:
    """Why `serve` should not start with these settings: listening beyond loopback with tokenless admin
    routes (any proxy on the host would make every client local). None when fine."""
    if settings.auth.admin_token is not None or settings.auth.insecure_admin:
        return None
    if is_loopback_host(settings.host):
        return None
    return (
        f"refusing to listen on {settings.host} with no admin token: set auth.admin_token "
        "(LORA_GATEWAY_AUTH__ADMIN_TOKEN), or pass --insecure-admin (auth.insecure_admin) to serve "
        "tokenless admin routes to loopback peers anyway"
    )
