"""Real receivers for the sink tests: an HTTP server (plain JSON lines, or Splunk HEC's request shape and
token), and rsyslogd from Debian's package listening on TCP and writing what it reads to a file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class HttpReceiver:
    """Records the events POSTed to it. `hec_token` set: it is a Splunk HEC endpoint, answering 401 to any other
    token and 400 to a body that is not HEC's concatenated event objects. `hold_at` = n: the n-th request is
    read and recorded, `held` is set, and it is left unanswered until `release` is set."""

    def __init__(self, port: int = 0, hec_token: str | None = None):
        self.port, self.hec_token = port or free_port(), hec_token
        self.events: list[dict] = []  # as delivered, in order, repeats included
        self.requests: list[dict] = []  # {path, headers}
        self.hold_at: int | None = None
        self.held, self.release = threading.Event(), threading.Event()
        self.fail_next = 0  # answer this many requests 503
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> HttpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers)})
                if receiver.fail_next:
                    receiver.fail_next -= 1
                    return self.answer(503, {"text": "busy"})
                if receiver.hec_token is not None:
                    if self.headers.get("Authorization") != f"Splunk {receiver.hec_token}":
                        return self.answer(401, {"text": "Invalid token", "code": 4})
                    try:
                        events = receiver.hec_events(body)
                    except ValueError as exc:
                        return self.answer(400, {"text": str(exc), "code": 6})
                else:
                    events = [json.loads(line) for line in body.split(b"\n") if line]
                if receiver.hold_at == len(receiver.requests):
                    receiver.events += events
                    receiver.held.set()
                    receiver.release.wait(60)
                    return
                receiver.events += events
                self.answer(200, {"text": "Success", "code": 0})

            def answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @staticmethod
    def hec_events(body: bytes) -> list[dict]:
        """HEC's event endpoint takes JSON objects one after another, each with `event` and optional metadata."""
        decoder, text, pos, events = json.JSONDecoder(), body.decode(), 0, []
        while pos < len(text):
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos == len(text):
                break
            obj, pos = decoder.raw_decode(text, pos)
            if not isinstance(obj, dict) or "event" not in obj or set(obj) - {"time", "host", "source", "sourcetype",
                                                                             "index", "fields", "event"}:  # fmt: skip
                raise ValueError("not an HEC event object")
            if not isinstance(obj.get("time", 0), int | float):
                raise ValueError("time is not a number")
            events.append(obj)
        return events

    def stop(self) -> None:
        if self.server:
            self.release.set()
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/collector/event"


class Rsyslog:
    """rsyslogd in the foreground with a config of its own: RFC 5424 over TCP (octet-counted) on `port`, each
    message written as `MSGID<TAB>STRUCTURED-DATA<TAB>MSG` to `out`."""

    def __init__(self, folder: Path, tls: bool = False):
        self.binary = shutil.which("rsyslogd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if not self.binary:
            pytest.skip("rsyslogd is not installed (.ci/run installs Debian's rsyslog)")
        self.folder, self.port, self.out = folder, free_port(), folder / "received.log"
        (folder / "work").mkdir(parents=True, exist_ok=True)
        self.config = folder / "rsyslog.conf"
        tls_global, tls_module = "", ""
        if tls:  # RFC 5425: rsyslog's OpenSSL stream driver, with a CA and server certificate made here
            self.ca = make_certificates(folder)
            tls_global = (f' DefaultNetstreamDriver="ossl" DefaultNetstreamDriverCAFile="{self.ca}"'
                          f' DefaultNetstreamDriverCertFile="{folder / "server.pem"}"'
                          f' DefaultNetstreamDriverKeyFile="{folder / "server.key"}"')  # fmt: skip
            tls_module = ' StreamDriver.Name="ossl" StreamDriver.Mode="1" StreamDriver.AuthMode="anon"'
        self.config.write_text(
            f'global(workDirectory="{folder / "work"}" maxMessageSize="256k"{tls_global})\n'
            f'module(load="imtcp"{tls_module})\n'
            'template(name="line" type="string" string="%msgid%\\t%structured-data%\\t%msg%\\n")\n'
            'ruleset(name="audit") {\n'
            f'  action(type="omfile" file="{self.out}" template="line")\n'
            "}\n"
            f'input(type="imtcp" port="{self.port}" address="127.0.0.1" ruleset="audit")\n'
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> Rsyslog:
        self.process = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.config), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        """SIGTERM: rsyslogd writes what it has read, then exits."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.process = None

    def messages(self) -> list[tuple[str, str, dict]]:
        """(MSGID, structured data, event) of each message written, in order."""
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text(encoding="utf-8").split("\n")[:-1]:  # not splitlines(): U+2028 in payloads
            msgid, sd, msg = line.split("\t", 2)
            found.append((msgid, sd, json.loads(msg)))
        return found


def make_certificates(folder: Path) -> Path:
    """A CA and a certificate for 127.0.0.1 and localhost signed by it (openssl's command line); the CA's path."""
    if not shutil.which("openssl") or not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_ossl.so")):
        pytest.skip("openssl or rsyslog's OpenSSL driver is missing (.ci/run installs rsyslog-openssl)")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=audit-ingest test CA")  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"
    )
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.cnf")  # fmt: skip
    return folder / "ca.pem"
