"""`splunk_hec`: Splunk's HTTP Event Collector. Events go to `url` (the collector's `/services/collector/event`
endpoint) as concatenated JSON objects `{"time", "source", "sourcetype", "event"}`, with
`Authorization: Splunk <token>`, the token read from `token_env`. HEC answers `{"text": "Success", "code": 0}`."""

from __future__ import annotations

import httpx
import orjson

from ingest.errors import SinkError
from ingest.sinks.http import HttpSink


class SplunkHecSink(HttpSink):
    content_type = "application/json"

    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type, "Authorization": f"Splunk {self.config.token()}"}

    def body(self, events: list[dict], lines: list[bytes]) -> bytes:
        sourcetype = f"openai:audit:{self.config.format}"
        return b"\n".join(
            b'{"time":%d,"source":"openai-audit-ingest","sourcetype":%s,"event":%s}'
            % (int(event.get("effective_at") or 0), orjson.dumps(sourcetype), line)
            for event, line in zip(events, lines, strict=True)
        )

    def check(self, response: httpx.Response) -> None:
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if not response.is_success or answer.get("code") != 0:
            text = answer.get("text") or response.reason_phrase
            raise SinkError(f"{self.config.url} answered {response.status_code} ({text})")
