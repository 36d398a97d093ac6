"""Which hosts a load test may target: loopback only.

Load is only ever sent to a server on the same machine (127.0.0.0/8, ``::1``,
or a name that resolves only to those). In docker compose the ``loadtest``
service shares the load balancer's network namespace, so it too reaches the
API on 127.0.0.1 and the same rule holds there. Both ``vstar loadtest`` and the
locustfile call ``require_loopback`` before the first request.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def require_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash, or raise ``ValueError`` when its host is not loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--host must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
    try:
        parts.port  # noqa: B018 - read for its check: a port that is not 0-65535
    except ValueError:
        raise ValueError(f"--host {url!r}: the port must be a number 0-65535") from None
    bad = [a for a in _addresses(parts.hostname) if not ipaddress.ip_address(a).is_loopback]
    if bad:
        raise ValueError(f"--host {url!r} resolves to {bad}: load tests only target loopback (127.0.0.0/8, ::1)")
    return url.rstrip("/")


def _addresses(host: str) -> list[str]:
    """IP addresses of ``host``: itself when it is a literal, else every address it resolves to."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise ValueError(f"--host name {host!r} does not resolve: {e}") from None
    # scope ids ("fe80::1%eth0") are not part of the address proper
    return sorted({str(info[4][0]).split("%")[0] for info in infos})
