"""The SSRF-hardened HTTP client for callbacks: no private networks, no redirects, bounded time."""

import functools
import time
from dataclasses import dataclass

import requests
from django.conf import settings
from requests_hardened import Config, Manager

from orders.urlsafety import UnsafeUrl, callback_url_check

EXCERPT_BYTES = 1024


@functools.cache
def _session() -> requests.Session:
    # One pooled keep-alive session per process; the IP filter resolves and checks every connection.
    config = Config(
        ip_filter_enable=not settings.CALLBACK_ALLOW_PRIVATE_NETWORKS,
        ip_filter_allow_loopback_ips=False,
        never_redirect=True,
        default_timeout=(settings.CALLBACK_CONNECT_TIMEOUT, settings.CALLBACK_TOTAL_TIMEOUT),
        user_agent_override="payments-callbacks/1.0",
    )
    return Manager(config).get_session()


@dataclass(frozen=True)
class PostResult:
    status_code: int | None
    latency_ms: int
    error: str
    excerpt: str

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post_json(*, url: str, body: str, headers: dict[str, str]) -> PostResult:
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        callback_url_check(url, resolve=False)
    except UnsafeUrl as exc:
        return PostResult(None, elapsed(), f"refused: {exc}", "")
    deadline = started + settings.CALLBACK_TOTAL_TIMEOUT
    try:
        with _session().post(url, data=body.encode(), headers=headers, stream=True) as response:
            chunks, size = [], 0
            for chunk in response.iter_content(chunk_size=EXCERPT_BYTES):
                chunks.append(chunk)
                size += len(chunk)
                if size >= EXCERPT_BYTES or time.monotonic() > deadline:
                    break
            excerpt = b"".join(chunks)[:EXCERPT_BYTES].decode("utf-8", errors="replace")
            return PostResult(response.status_code, elapsed(), "", excerpt)
    except requests.RequestException as exc:
        return PostResult(None, elapsed(), f"{exc.__class__.__name__}: {exc}"[:500], "")
