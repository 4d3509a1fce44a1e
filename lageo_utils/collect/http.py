"""HTTP for the collectors: one requests Session, a rate limit, retries with backoff, secrets kept out of sight.

A key or token is added to a request only when it is sent. Every message this module builds, and
every urllib3/requests log record while a client is open, has the secrets and credential query
parameters replaced by ``***``; URLs in messages never carry a query string.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import requests

from lageo_utils import __version__
from lageo_utils.files import atomic_write

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
USER_AGENT = f"lageo/{__version__} (research image collection)"
CHUNK_BYTES = 1 << 16
# Loggers that may print request URLs (urllib3 logs every request line at DEBUG).
URL_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.response", "urllib3.util.retry", "requests")
_CREDENTIAL_PARAM = re.compile(r"(?i)\b(key|access_token|signature|client_secret)=[^&\s'\"]*")
_AUTH_HEADER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(oauth|bearer)\s+[^'\"\s,}]+")


class CollectError(RuntimeError):
    """A collection run cannot go on; the message says why and never holds a secret."""


class AuthError(CollectError):
    """The service refused the key or token (stop: retrying cannot help)."""


class BudgetExhausted(CollectError):
    """The image budget is spent; the run stops cleanly and a later run resumes."""


class Retryable(Exception):
    """Raised by a response check: the answer is a transient failure, send the request again."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for 429, 5xx, dropped connections and transient answers."""

    max_retries: int = 5
    backoff_s: float = 1.0  # first wait; doubles on each retry
    max_backoff_s: float = 60.0
    max_retry_after_s: float = 300.0  # a server asking for a longer wait stops the run instead

    def wait_s(self, retry: int, retry_after_s: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), at least any Retry-After."""
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        if retry_after_s is None:
            return backoff
        if retry_after_s > self.max_retry_after_s:
            raise CollectError(
                f"the server asked to wait {retry_after_s:.0f} s (Retry-After), longer than "
                f"{self.max_retry_after_s:.0f} s; stopped, re-run later to resume"
            )
        return max(backoff, retry_after_s)


DEFAULT_RETRY = RetryPolicy()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def url_without_query(url: str) -> str:
    """``scheme://host/path``: how URLs appear in messages (queries may carry keys or signatures)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class Redactor:
    """Replaces secrets (plain and URL-encoded) and credential parameters in text."""

    def __init__(self, secrets=()):
        values = [s for s in secrets if s]
        self._needles = sorted({v for s in values for v in (s, quote(s, safe=""), quote(s))}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            text = text.replace(needle, "***")
        text = _CREDENTIAL_PARAM.sub(lambda m: f"{m.group(1)}=***", text)
        return _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)} ***", text)

    def __repr__(self) -> str:
        return f"Redactor({len(self._needles)} needles)"


class _RedactingFilter(logging.Filter):
    def __init__(self, redact: Redactor):
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = ()
        return True


class ApiClient:
    """GET requests against one API: rate limited, retried, with credentials added at send time.

    ``auth_params`` / ``auth_headers`` (the key or token) go only on requests with ``auth=True``;
    ``max_downloads`` caps the image requests sent (retries included), raising ``BudgetExhausted``.
    Use as a context manager: the session is closed and the log filters removed on exit.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth_params: dict[str, str] | None = None,
        auth_headers: dict[str, str] | None = None,
        rate: float | None = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_downloads: int | None = None,
        timeout_s: tuple[float, float] = (10.0, 60.0),
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive (requests per second), not {rate}")
        self.base_url = base_url.rstrip("/")
        self._auth_params = dict(auth_params or {})
        self._auth_headers = dict(auth_headers or {})
        self.redact = Redactor([*self._auth_params.values(), *self._auth_headers.values(),
                                *(v.split()[-1] for v in self._auth_headers.values())])
        self.rate = rate
        self.retry = retry
        self.max_downloads = max_downloads
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.clock = clock
        self.requests_sent = 0
        self.downloads_sent = 0
        self._next_send = 0.0
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self._filter = _RedactingFilter(self.redact)
        for name in URL_LOGGERS:
            logging.getLogger(name).addFilter(self._filter)

    def __repr__(self) -> str:
        return f"ApiClient({self.base_url!r}, requests_sent={self.requests_sent})"

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()
        for name in URL_LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)

    def url(self, path_or_url: str) -> str:
        """An absolute URL: paths join the base URL; absolute URLs are kept."""
        return urljoin(self.base_url + "/", path_or_url.lstrip("/")) if "://" not in path_or_url else path_or_url

    def get(self, path_or_url: str, params: dict | None = None, *, auth: bool = True,
            check: Callable[[requests.Response], None] | None = None) -> requests.Response:
        """GET with the body read; ``check`` may raise ``Retryable`` for a transient answer."""

        def consume(response):
            response.content  # noqa: B018 (read the body inside the retry loop: a cut body is retried)
            if check is not None:
                check(response)

        return self._send(path_or_url, params, auth, consume, stream=False, download=False)

    def download(self, path_or_url: str, dest: Path, params: dict | None = None, *, auth: bool = True,
                 check_file: Callable[[Path], None] | None = None) -> requests.Response:
        """GET a file into ``dest``: streamed to ``dest.part``, checked, synced, renamed into place.

        Only a 200 answer writes a file; other answers return with their (small) body read.
        ``check_file`` may raise ``Retryable`` (e.g. an undecodable image). Counts toward ``max_downloads``.
        """

        def consume(response):
            if response.status_code != 200:
                response.content  # noqa: B018 (keep the error text for the caller)
                return
            write_atomically(response.iter_content(CHUNK_BYTES), dest, check_file)

        return self._send(path_or_url, params, auth, consume, stream=True, download=True)

    def _send(self, path_or_url, params, auth, consume, *, stream: bool, download: bool) -> requests.Response:
        url = self.url(path_or_url)
        where = url_without_query(url)
        problem, retry_after = "", None
        attempts = self.retry.max_retries + 1
        for attempt in range(attempts):
            if attempt:
                wait = self.retry.wait_s(attempt, retry_after)
                log.warning("%s: %s; retry %d of %d in %.3g s", where, problem, attempt, self.retry.max_retries, wait)
                self.sleep(wait)
            if download:
                if self.max_downloads is not None and self.downloads_sent >= self.max_downloads:
                    raise BudgetExhausted(f"the budget of {self.max_downloads} image requests is spent")
                self.downloads_sent += 1
            self._throttle()
            self.requests_sent += 1
            retry_after = None
            try:
                response = self.session.get(
                    url,
                    params={**(params or {}), **(self._auth_params if auth else {})},
                    headers=self._auth_headers if auth else None,
                    timeout=self.timeout_s,
                    stream=stream,
                )
                with response:
                    if response.status_code in RETRY_STATUSES:
                        problem = f"HTTP {response.status_code}"
                        retry_after = parse_retry_after(response.headers.get("Retry-After"))
                        continue
                    consume(response)
                    return response
            except Retryable as exc:
                problem = self.redact(str(exc))
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {self.redact(str(exc))}"
        raise CollectError(f"{where}: gave up after {attempts} attempts (last: {problem}); re-run to resume")

    def _throttle(self) -> None:
        if self.rate is None:
            return
        now = self.clock()
        if now < self._next_send:
            self.sleep(self._next_send - now)
            now = self._next_send
        self._next_send = now + 1.0 / self.rate


def write_atomically(chunks, dest: Path, check_file: Callable[[Path], None] | None = None) -> int:
    """Write chunks to a temporary file, check it, then rename it to ``dest``; returns the size.

    A failure (or a kill) never leaves a partial ``dest``.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        if check_file is not None:
            check_file(tmp)

    return atomic_write(dest, write).stat().st_size
