"""Sends one node report to the motoko agent's fleet API (``POST /v1/reports``) over httpx.

Every outcome is a ``Sent``: delivered, refused by motoko (its HTTP code and the one-line
reason from its JSON answer) or not delivered at all (motoko unreachable, timed out: the
reason in one line). Every httpx error is mapped here; nothing escapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

#: The longest reason kept from an answer or an error (one log line, not a page).
MAX_DETAIL = 200


@dataclass(frozen=True, slots=True)
class Sent:
    #: The HTTP code motoko answered; ``None`` when it was not reached.
    status: int | None
    detail: str = ""

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def refused(self) -> bool:
        """Motoko answered and refused the report (4xx): sending it sooner will not help."""
        return self.status is not None and 400 <= self.status < 500


class HttpxSender:
    """``sender(url, token, body) -> Sent``; one connection pool, bounded by ``timeout_s``."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False, trust_env=False)

    def __call__(self, url: str, token: str, body: bytes) -> Sent:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            r = self.client.post(f"{url.rstrip('/')}/v1/reports", content=body, headers=headers)
        except httpx.TimeoutException:
            return Sent(None, "timed out")
        except httpx.HTTPError as exc:
            return Sent(None, _one_line(f"{type(exc).__name__}: {exc}"))
        return Sent(r.status_code, "" if r.is_success else _reason(r))

    def close(self) -> None:
        self.client.close()


def _reason(r: httpx.Response) -> str:
    try:
        error = r.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return _one_line(f"HTTP {r.status_code}: {error if isinstance(error, str) else r.text or r.reason_phrase}")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_DETAIL]


@dataclass(frozen=True, slots=True)
class DrainAnswer:
    """motoko's answer to a drain request: ``status`` None when it was not reached."""

    status: int | None
    body: dict[str, object]
    detail: str = ""

    @property
    def granted(self) -> bool:
        return self.status == 200 and self.body.get("granted") is True

    @property
    def waiting(self) -> bool:
        """Not granted yet (another chain member is out): ask again."""
        return self.status == 409


class HttpxDrains:
    """``ask(url, token, reason)`` and ``release(url, token)`` against ``/v1/drains``."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False, trust_env=False)

    def ask(self, url: str, token: str, reason: str) -> DrainAnswer:
        return self._call("POST", url, token, {"reason": reason})

    def release(self, url: str, token: str) -> DrainAnswer:
        return self._call("DELETE", url, token, None)

    def _call(self, method: str, url: str, token: str, body: dict[str, str] | None) -> DrainAnswer:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            r = self.client.request(method, f"{url.rstrip('/')}/v1/drains", json=body, headers=headers)
        except httpx.TimeoutException:
            return DrainAnswer(None, {}, "timed out")
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: the client was closed
            return DrainAnswer(None, {}, _one_line(f"{type(exc).__name__}: {exc}"))
        try:
            data = r.json()
        except ValueError:
            data = None
        parsed = data if isinstance(data, dict) else {}
        return DrainAnswer(r.status_code, parsed, "" if r.is_success else _reason(r))

    def close(self) -> None:
        self.client.close()
