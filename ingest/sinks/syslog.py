"""`syslog`: RFC 5424 messages over TCP (RFC 6587 octet counting) or TLS (RFC 5425) to `host`:`port`.

One message per event: the event's time, APP-NAME `audit-ingest`, MSGID the event type (cut to RFC 5424's
32 characters), structured data `[openai@32473 id="<event id>"]`, and the event in its format as MSG.
Syslog has no acknowledgement, so each batch goes over a connection of its own that the sink half-closes
and then waits on until the receiver closes it: the receiver has then read every message (rsyslog closes
a session when it reads its end). A batch whose connection fails is sent again whole.
"""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime

from ingest import mapping
from ingest.errors import SinkError
from ingest.sinks.base import Sink

_SD_ID = "openai@32473"  # 32473: the example enterprise number RFC 5424 reserves for documentation
_SEVERITY_INFO, _SEVERITY_NOTICE = 6, 5


class SyslogSink(Sink):
    def __init__(self, config) -> None:
        super().__init__(config)
        self._hostname = socket.gethostname().split(".")[0][:255] or "-"

    def message(self, event: dict, line: bytes) -> bytes:
        event_type = str(event.get("type") or "-")
        severity = _SEVERITY_NOTICE if mapping.facts(event).failed else _SEVERITY_INFO
        at = datetime.fromtimestamp(int(event.get("effective_at") or 0), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        msgid = "".join(c for c in event_type if 33 <= ord(c) <= 126)[:32] or "-"
        event_id = str(event.get("id")).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
        header = (f"<{self.config.facility * 8 + severity}>1 {at} {self._hostname} audit-ingest - {msgid} "
                  f'[{_SD_ID} id="{event_id}"] ')  # fmt: skip
        body = header.encode() + line
        return b"%d %s" % (len(body), body)

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.config.host, self.config.port), timeout=self.config.timeout)
        if not self.config.tls:
            return raw
        context = ssl.create_default_context(cafile=self.config.ca_file)
        return context.wrap_socket(raw, server_hostname=self.config.host)

    def send(self, events: list[dict], lines: list[bytes]) -> None:
        data = b"".join(self.message(e, line) for e, line in zip(events, lines, strict=True))
        where = f"{self.config.host}:{self.config.port}"
        try:
            with self._connect() as sock:
                sock.sendall(data)
                if isinstance(sock, ssl.SSLSocket):
                    sock = sock.unwrap()  # TLS close_notify, then the TCP half-close below
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # until the receiver, having read everything, closes
                    pass
        except (OSError, ssl.SSLError) as exc:
            raise SinkError(f"syslog {where}: {exc.strerror or exc}") from None
