"""A minimal SMTP server (RFC 5321 subset: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT).

Enough for smtplib, and so Airflow's SMTP provider, to deliver to it; it keeps every
message it receives in ``messages`` as (mail_from, rcpt_tos, raw bytes).
"""

from __future__ import annotations

import socketserver
import threading

__all__ = ["SmtpServer"]


class _Handler(socketserver.StreamRequestHandler):
    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        mail_from, rcpts = None, []
        self._reply("220 localhost almanac-test-smtp")
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            verb, _, arg = raw.decode("utf-8", "replace").strip().partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.wfile.write(b"250-localhost\r\n250 8BITMIME\r\n")
            elif verb == "HELO":
                self._reply("250 localhost")
            elif verb == "MAIL":
                mail_from, rcpts = arg.partition(":")[2].strip().strip("<>").split(">")[0], []
                self._reply("250 OK")
            elif verb == "RCPT":
                rcpts.append(arg.partition(":")[2].strip().strip("<>").split(">")[0])
                self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                lines = []
                while (line := self.rfile.readline()) not in (b".\r\n", b".\n", b""):
                    lines.append(line[1:] if line.startswith(b"..") else line)
                self.server.messages.append((mail_from, rcpts, b"".join(lines)))
                self._reply("250 OK queued")
            elif verb in ("RSET", "NOOP"):
                self._reply("250 OK")
            elif verb == "QUIT":
                self._reply("221 Bye")
                return
            else:
                self._reply("502 Command not implemented")


class SmtpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.messages: list[tuple[str, list[str], bytes]] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def __enter__(self) -> SmtpServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
