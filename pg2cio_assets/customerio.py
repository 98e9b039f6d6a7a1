"""Customer.io Track API v2: the limits table, op builders, batch packing, and an HTTP client.

The pure parts (limits, `op_problem`, `pack_batches`) decide what may be sent and how it is
grouped; `TrackClient` sends one batch over httpx with a client-side rate limit, retries with
exponential backoff and jitter on 429 / 5xx / timeouts / dropped connections (honouring
Retry-After), maps a 207's errors back to the ops, and stops on 400 / 401 with a clear message.
Credentials are only ever placed in the Authorization header.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

# --- the limits (customerio_facts.md): check them before sending, a rejected op is a lost update
MAX_REQUEST_BYTES = 500 * 1024  # a batch request must stay under this
MAX_OP_BYTES = 32 * 1024  # one op in a v2 batch
MAX_NAME_BYTES = 150  # an id or an attribute name
MAX_VALUE_BYTES = 1000  # an attribute value
MAX_ATTRIBUTES = 300  # unique attributes per identify
MAX_EVENT_NAME_BYTES = 100
MAX_EVENT_DATA_BYTES = 100_000
TRIGGER_WINDOW_HOURS = 72  # an event stamped within this many hours of now can trigger campaigns

LIMITS: tuple[tuple[str, str], ...] = (
    ("batch request", f"under {MAX_REQUEST_BYTES:,} bytes"),
    ("one op in a batch", f"at most {MAX_OP_BYTES:,} bytes"),
    ("id, attribute name", f"at most {MAX_NAME_BYTES} bytes"),
    ("attribute value", f"at most {MAX_VALUE_BYTES:,} bytes"),
    ("attributes per identify", f"at most {MAX_ATTRIBUTES}"),
    ("event name", f"at most {MAX_EVENT_NAME_BYTES} bytes"),
    ("event data", f"at most {MAX_EVENT_DATA_BYTES:,} bytes"),
    ("event that can trigger a campaign", f"stamped within the last {TRIGGER_WINDOW_HOURS} hours (older ones only count for segments)"),
)
_BATCH_OVERHEAD = len(b'{"batch":[]}')


def encode(op: dict) -> bytes:
    return json.dumps(op, separators=(",", ":"), ensure_ascii=False).encode()


def _bytes(value: object) -> int:
    return len(value.encode()) if isinstance(value, str) else len(encode(value))


def op_problem(op: dict, encoded: bytes | None = None) -> str | None:
    """Why Customer.io would reject this op, or None. Checked before anything is sent."""
    size = len(encoded if encoded is not None else encode(op))
    if size > MAX_OP_BYTES:
        return f"op is {size:,} bytes, over the {MAX_OP_BYTES:,}-byte limit of a batched op"
    idents = op.get("identifiers") if op.get("action") != "merge" else op.get("primary")
    if not isinstance(idents, dict) or len(idents) != 1:
        return "identifiers must hold exactly one of id, email, cio_id"
    (key, value), = idents.items()
    if key not in ("id", "email", "cio_id") or not isinstance(value, str) or not value:
        return f"identifier {key!r} must be a non-empty id, email or cio_id"
    if _bytes(value) > MAX_NAME_BYTES:
        return f"identifier {key} is {_bytes(value)} bytes, over {MAX_NAME_BYTES}"
    attrs = op.get("attributes") or {}
    if op.get("action") == "identify":
        if len(attrs) > MAX_ATTRIBUTES:
            return f"{len(attrs)} attributes, over the {MAX_ATTRIBUTES} Customer.io accepts in one identify"
        for name, value in attrs.items():
            if _bytes(name) > MAX_NAME_BYTES:
                return f"attribute name {name[:40]!r}... is {_bytes(name)} bytes, over {MAX_NAME_BYTES}"
            if value is not None and _bytes(value if isinstance(value, str) else json.dumps(value)) > MAX_VALUE_BYTES:
                return f"attribute {name} is {_bytes(str(value))} bytes, over {MAX_VALUE_BYTES:,}"
    if op.get("action") == "event":
        name = op.get("name")
        if not isinstance(name, str) or not name or _bytes(name) > MAX_EVENT_NAME_BYTES:
            return f"event name must be 1..{MAX_EVENT_NAME_BYTES} bytes"
        if _bytes(attrs) > MAX_EVENT_DATA_BYTES:
            return f"event data is {_bytes(attrs):,} bytes, over {MAX_EVENT_DATA_BYTES:,}"
    return None


def pack_batches(encoded_ops: list[bytes], max_request_bytes: int = MAX_REQUEST_BYTES) -> list[list[int]]:
    """Indices of ops grouped into batches, in order, each request strictly under the limit.

    Order is kept (merges before the events that rely on them); a batch is closed only when
    the next op would not fit, so batches are as full as the limit allows."""
    batches: list[list[int]] = []
    current: list[int] = []
    size = _BATCH_OVERHEAD
    for i, op in enumerate(encoded_ops):
        extra = len(op) + (1 if current else 0)
        if current and size + extra >= max_request_bytes:
            batches.append(current)
            current, size, extra = [], _BATCH_OVERHEAD, len(op)
        if size + extra >= max_request_bytes:
            raise ValueError(f"op {i} is {len(op):,} bytes and cannot fit any batch; check op_problem() first")
        current.append(i)
        size += extra
    if current:
        batches.append(current)
    return batches


def batch_body(encoded_ops: list[bytes]) -> bytes:
    return b'{"batch":[' + b",".join(encoded_ops) + b"]}"


# --- the client ------------------------------------------------------------------------------


class CustomerIOError(RuntimeError):
    """Customer.io refused the request as a whole; retrying will not help."""


class CustomerIOAuthError(CustomerIOError):
    pass


class CustomerIOUnavailable(CustomerIOError):
    """Retries were exhausted on 429 / 5xx / timeouts / dropped connections."""


@dataclass
class BatchResult:
    status: int
    errors: dict[int, str] = field(default_factory=dict)  # index within the batch -> reason
    attempts: int = 1
    request_bytes: int = 0


class RateLimiter:
    """At most `per_second` requests a second, spread evenly (thread-safe)."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def retry_after_seconds(header: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


class TrackClient:
    """Sends batches to a Track API base URL (US, EU, a proxy or the emulator)."""

    RETRY_STATUSES = {429, 500, 502, 503, 504}

    def __init__(self, base_url: str, site_id: str, api_key: str, *, rate_per_second: float = 100.0,
                 max_retries: int = 6, timeout: float = 30.0, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 log: Callable[[str], None] = lambda _m: None):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, auth=(site_id, api_key), timeout=timeout,
                                  headers={"Content-Type": "application/json", "User-Agent": "pg2cio"})
        self.limiter = RateLimiter(rate_per_second)
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.log = log
        self.requests = 0
        self.bytes_sent = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TrackClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        return min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def post(self, path: str, body: bytes) -> httpx.Response:
        """POST with rate limit and retries; returns the final non-retryable response."""
        attempt = 0
        while True:
            attempt += 1
            self.limiter.wait()
            self.requests += 1
            self.bytes_sent += len(body)
            try:
                response = self._http.post(path, content=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                reason, wait = f"{type(exc).__name__}", self._backoff(attempt, None)
            else:
                if response.status_code not in self.RETRY_STATUSES:
                    response.extensions["pg2cio_attempts"] = attempt
                    return response
                reason = f"HTTP {response.status_code}"
                wait = self._backoff(attempt, retry_after_seconds(response.headers.get("Retry-After")))
            if attempt > self.max_retries:
                raise CustomerIOUnavailable(
                    f"{self.base_url}{path}: gave up after {attempt} attempts (last: {reason}); nothing in this "
                    "batch is recorded as accepted, a rerun sends it again"
                )
            self.log(f"{path}: {reason}, retry {attempt}/{self.max_retries} in {wait:.2f}s")
            time.sleep(wait)

    def send_batch(self, encoded_ops: list[bytes]) -> BatchResult:
        body = batch_body(encoded_ops)
        response = self.post("/api/v2/batch", body)
        attempts = response.extensions.get("pg2cio_attempts", 1)
        if response.status_code == 200:
            return BatchResult(200, attempts=attempts, request_bytes=len(body))
        if response.status_code == 207:
            errors: dict[int, str] = {}
            for err in _json(response).get("errors", []):
                index = err.get("batch_index")
                if isinstance(index, int) and 0 <= index < len(encoded_ops):
                    parts = [err.get("reason"), err.get("field"), err.get("message")]
                    errors[index] = ": ".join(str(p) for p in parts if p) or "rejected"
            return BatchResult(207, errors, attempts, len(body))
        if response.status_code == 401:
            raise CustomerIOAuthError(
                f"{self.base_url} answered 401: check CUSTOMERIO_SITE_ID and CUSTOMERIO_API_KEY (a Track API key "
                "of this workspace and region)"
            )
        detail = json.dumps(_json(response).get("errors", response.text[:500]))[:800]
        raise CustomerIOError(f"{self.base_url}/api/v2/batch answered {response.status_code}: {detail}")


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
