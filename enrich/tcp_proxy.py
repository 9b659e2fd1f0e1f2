"""A loopback TCP proxy a test can cut and restore, to take a real service "down" for one client only."""

from __future__ import annotations

import contextlib
import socket
import threading

Pair = tuple[socket.socket, socket.socket]  # (client, upstream)


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._up = True
        self._blackhole = False
        # Each open pair (client, upstream) -> how many of its two pipe threads still run.
        self._pairs: dict[Pair, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones, as a crashed server would."""
        with self._lock:
            self._up = False
            # Only shut down: the pipe threads wake, and the last of a pair closes both sockets. Closing a
            # descriptor here, while a pipe thread may be entering recv() on it, could hand that thread a
            # reused descriptor of a later connection, whose bytes it would then swallow.
            for pair in self._pairs:
                for sock in pair:
                    _shutdown(sock)

    def blackhole(self) -> None:
        """Keep every connection open but let no byte through, as a server gone without closing would (a
        dead node, a failover, a NAT that dropped its state): writes succeed, replies never come."""
        self._blackhole = True

    def up(self) -> None:
        """Accept and forward again (what the connections sent into a black hole stays lost)."""
        with self._lock:
            self._up = True
            self._blackhole = False

    def close(self) -> None:
        self._closed = True
        self.down()
        _shutdown(self._listener)  # wakes accept(); the accept loop, its only user, closes it

    def _accept_loop(self) -> None:
        with self._listener:
            while not self._closed:
                try:
                    client, _ = self._listener.accept()
                except OSError:
                    return
                self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)  # the timeout is for connecting; an idle connection stays open
        except OSError:
            client.close()
            return
        pair: Pair = (client, upstream)
        with self._lock:  # a connection accepted while down() runs must not outlive it
            if not self._up:
                client.close()
                upstream.close()
                return
            self._pairs[pair] = 2
        for source, sink in (pair, pair[::-1]):
            threading.Thread(target=self._pipe, args=(pair, source, sink), daemon=True).start()

    def _pipe(self, pair: Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                if not self._blackhole:
                    sink.sendall(chunk)
        except OSError:
            pass
        # One side ended: end both directions (each end sees the other go away), then the second of the
        # two pipe threads, the last user of the sockets, closes them.
        for sock in pair:
            _shutdown(sock)
        with self._lock:
            self._pairs[pair] -= 1
            last = self._pairs[pair] == 0
            if last:
                del self._pairs[pair]
        if last:
            for sock in pair:
                sock.close()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
