"""`http`: JSON lines POSTed in batches to `url`, with the configured `headers` (and a Bearer token from
`token_env`). A 2xx answer is delivery; anything else, or no answer, is retried."""

from __future__ import annotations

import httpx

from ingest.errors import SinkError
from ingest.sinks.base import Sink


class HttpSink(Sink):
    content_type = "application/x-ndjson"

    def __init__(self, config) -> None:
        super().__init__(config)
        self._client: httpx.Client | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type, **self.config.headers}
        if token := self.config.token():
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def body(self, events: list[dict], lines: list[bytes]) -> bytes:
        return b"".join(line + b"\n" for line in lines)

    def check(self, response: httpx.Response) -> None:
        """Raises SinkError unless the receiver took the batch."""
        if not response.is_success:
            raise SinkError(f"{self.config.url} answered {response.status_code}")

    def send(self, events: list[dict], lines: list[bytes]) -> None:
        if self._client is None:
            self._client = httpx.Client(timeout=self.config.timeout, headers=self.headers())
        try:
            response = self._client.post(str(self.config.url), content=self.body(events, lines))
        except httpx.HTTPError as exc:  # the message names the URL and the cause, never a header
            raise SinkError(f"{self.config.url}: {type(exc).__name__}: {exc}") from None
        self.check(response)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
