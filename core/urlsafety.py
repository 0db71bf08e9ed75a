"""Which callback URLs may be called: http(s), no userinfo, and not into private networks (SPEC 7)."""

import concurrent.futures
import ipaddress
import socket
from urllib.parse import urlsplit

from django.conf import settings


class UnsafeUrl(ValueError):
    pass


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


# Order creation resolves the callback host in the request thread. A lookup can hang far longer
# than a request may take (a dead nameserver: resolver retries, tens of seconds), and it cannot
# be interrupted. So lookups run on a few threads of their own and the request waits at most
# CALLBACK_URL_RESOLVE_TIMEOUT_SECONDS; past that the host counts as "not resolvable now", as
# before, and delivery resolves again and refuses private addresses then (callbacks/http.py),
# which is the check that matters: DNS may answer differently by then anyway. Resolving only at
# delivery would lose SPEC 7's 400 at creation for the hosts that answer in time. Four threads
# per process bound what hung lookups can hold; a request's lookup still queued when it gives up
# is cancelled, so the queue holds at most one lookup per waiting request.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="callback-url-dns")


def _resolve(host: str, port: int) -> list | None:
    """getaddrinfo's answer, or None when it did not come within the timeout."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return future.result(timeout=settings.CALLBACK_URL_RESOLVE_TIMEOUT_SECONDS)
    except concurrent.futures.TimeoutError:
        future.cancel()
        return None


def callback_url_check(url: str, *, resolve: bool = True) -> None:
    """Raise UnsafeUrl when `url` is not a URL we are willing to POST to."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl("not a valid URL") from exc
    if port == 0:
        # urlsplit takes it; the HTTP client would then call port 80 (or 443) instead
        raise UnsafeUrl("not a valid URL: port 0")
    if parts.scheme not in ("http", "https"):
        raise UnsafeUrl("only http and https URLs are accepted")
    if not parts.hostname:
        raise UnsafeUrl("the URL has no host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UnsafeUrl("credentials in the URL are not accepted")
    if settings.CALLBACK_ALLOW_PRIVATE_NETWORKS or not resolve:
        return
    host = parts.hostname
    try:
        infos = _resolve(host, port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        infos = None
    if infos is None:
        # Not resolvable now; delivery resolves again and refuses private addresses then.
        return
    for info in infos:
        if not _is_public(ipaddress.ip_address(info[4][0].split("%")[0])):
            raise UnsafeUrl("the URL points to a private, loopback or link-local address")
