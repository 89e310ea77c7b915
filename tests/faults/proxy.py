"""A small TCP proxy for network faults (loopback only): it forwards 127.0.0.1:<port> to a
server on 127.0.0.1 and, on demand, stalls, cuts or resets every connection through it.

- ``stall(seconds)``: nothing is forwarded in either direction for that long (bytes wait in the
  kernel's buffers), then traffic resumes: a congested or briefly partitioned link.
- ``cut()``: both sides of every open connection are closed normally (FIN): a peer or a
  middlebox that closes the connection.
- ``reset()``: both sides are closed with ``SO_LINGER`` 0, so each receives a TCP RST: a peer
  that crashed or a firewall that drops the connection's state.

New connections are accepted at all times (a fault hits the connections open at that moment).
One thread accepts; each connection has one thread pumping both directions with ``select``.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self, *, reset: bool) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        assert target_host.startswith("127.") or target_host == "localhost", "loopback only"
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stalled_until = 0.0
        self._stopped = threading.Event()
        self.accepted = 0
        self.faults: list[tuple[str, int]] = []  # (kind, connections hit)
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    # --- faults ------------------------------------------------------------------------------

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for pair in self._pairs if not pair.closed.is_set())

    def stall(self, seconds: float) -> int:
        """Hold every byte for ``seconds`` (returns at once; connections open now are counted)."""
        self._stalled_until = time.monotonic() + seconds
        hit = self.open_connections()
        self.faults.append(("stall", hit))
        return hit

    def cut(self) -> int:
        return self._close_all("cut", reset=False)

    def reset(self) -> int:
        return self._close_all("reset", reset=True)

    def _close_all(self, kind: str, *, reset: bool) -> int:
        with self._lock:
            pairs = [pair for pair in self._pairs if not pair.closed.is_set()]
            self._pairs = []
        for pair in pairs:
            pair.close(reset=reset)
        self.faults.append((kind, len(pairs)))
        return len(pairs)

    def close(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_all("close", reset=False)

    # --- forwarding --------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        peer = {pair.client: pair.server, pair.server: pair.client}
        try:
            while not pair.closed.is_set():
                if time.monotonic() < self._stalled_until:
                    time.sleep(0.01)
                    continue
                readable, _, _ = select.select(list(peer), [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:  # one side closed: close the other too
                        pair.close(reset=False)
                        return
                    peer[sock].sendall(data)
        except (OSError, ValueError):
            pair.close(reset=False)
