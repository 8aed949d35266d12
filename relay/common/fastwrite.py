"""Send a reply now, straight to the socket, when nothing is waiting.

Twisted's transport.write() buffers the data, asks epoll to watch the
socket for writability and sends on the reactor's next turn, then asks
epoll to stop watching: two epoll_ctl calls and a loop turn for every
reply.  SMTP and POP3 are lock-step (the client waits for each reply), so
under load that was a quarter of the relay's reactor time.  When the
transport is plain TCP with an empty buffer and no producer (or only an
unpaused streaming one), a direct
send() is what Twisted would do anyway, minus the round trip; anything left
over (a full socket buffer) and every error go through transport.write(),
so Twisted's own handling (buffering, flow control, connection loss) is
unchanged.
"""

from __future__ import annotations

from twisted.internet import tcp

_PLAIN = (tcp.Server, tcp.Client)


def send_now(t, data: bytes) -> None:
    if (
        type(t) in _PLAIN
        and t.connected
        and not t.disconnecting
        and not t.dataBuffer
        and not t._tempDataBuffer
        # a streaming producer that is not paused (the SMTP session itself,
        # relay.smtp.server) changes nothing here: the buffer is empty
        and (t.producer is None or (t.streamingProducer and not t.producerPaused))
        and not getattr(t, "TLS", False)
    ):
        try:
            n = t.socket.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            n = 0  # let Twisted meet the error on its own write path
        if n >= len(data):
            return
        data = data[n:]
    t.write(data)
