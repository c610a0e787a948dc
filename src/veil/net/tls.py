"""TCP transport with mutual TLS 1.3: parties in separate processes, on one host or many.

Security properties:

* **Confidentiality and integrity** of every byte between two parties: TLS 1.3 only (AEAD ciphers,
  forward secrecy). Nothing is ever pickled; payloads are raw bytes.
* **Mutual authentication**: both sides require a certificate chaining to the deployment's CA
  (``ca.pem`` from ``veil keygen``, the only trust anchor loaded), and after the handshake each side
  checks that the peer's certificate names exactly the party it expects (CN and SAN). A party with a
  certificate from another CA, or for another name, is refused with :class:`PartyError`.
* **Session binding**: after TLS both sides exchange a hello (party name + session id); a party of
  another run is refused. Every frame then carries the session id and a per-pair sequence number
  (see ``veil.net.transport``), so frames are never taken from another run, replayed or reordered.
* A connection that ends at a frame boundary is reported as the peer closing; the protocol layer
  fails on the message it still expects, so truncation cannot pass for data.

Connection setup: parties are ordered (the order of ``addresses``); every party listens on its own
address; for each pair the *later* party connects to the earlier one (retrying until
``connect_timeout``), the earlier one accepts.

The hello (party name + session id) and the threading model are described in
:mod:`veil.net.tlschannel`; frames follow :mod:`veil.net.transport`.
"""

from __future__ import annotations

import queue
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path

from veil.net.certs import Credentials, load_credentials, validate_party_names
from veil.net.tlschannel import SMALL, PeerClosed, TLSChannel
from veil.net.transport import (
    DEFAULT_TIMEOUT_S,
    HEADER,
    SESSION_ID_BYTES,
    PartyError,
    TrafficStats,
    Transport,
    pack_header,
)


def _contexts(creds: Credentials) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts: TLS 1.3 only, peer certificate required, our CA the only anchor."""
    contexts = []
    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # party names are checked after the handshake (CN and SAN)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(creds.ca))
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
        contexts.append(ctx)
    contexts[0].num_tickets = 0  # no session resumption
    return contexts[0], contexts[1]


def _addr(address: tuple[str, int]) -> tuple[str, int]:
    host, port = address
    return str(host), int(port)


def _setup_error(me: str, who: str, e: BaseException) -> PartyError:
    if isinstance(e, PartyError):
        return e
    if isinstance(e, ssl.SSLCertVerificationError):
        return PartyError(f"{me}: refused {who}: its certificate failed verification ({e.verify_message}): "
                          f"not signed by this deployment's CA (keys from another `veil keygen`?) or expired")
    if isinstance(e, ssl.SSLError) and "ALERT" in (e.reason or ""):
        return PartyError(f"{me}: {who} refused our TLS handshake ({e.reason}): it does not accept our "
                          f"certificate (keys from another `veil keygen`, or an expired certificate?)")
    if isinstance(e, ssl.SSLError):
        return PartyError(f"{me}: TLS handshake with {who} failed ({e.reason or e}); one side refused "
                          f"the other's certificate (keys from another `veil keygen`?)")
    if isinstance(e, PeerClosed | ConnectionError):
        return PartyError(f"{me}: {who} closed the connection during setup (it may have refused our "
                          f"certificate, name or session id)")
    if isinstance(e, TimeoutError):
        return PartyError(f"{me}: setup with {who} timed out (the party is stalled or not a Veil party)")
    return PartyError(f"{me}: setup with {who} failed: {e}")


def _dial(me: str, peer: str, addr: tuple[str, int], ctx: ssl.SSLContext, session_id: bytes,
          deadline: float, connect_timeout: float) -> TLSChannel:
    who, last = f"{peer!r} at {addr[0]}:{addr[1]}", None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PartyError(f"{me}: could not connect to {who} within {connect_timeout:g} s ({last}); "
                             f"is it running, and is the address right?")
        try:
            sock = socket.create_connection(addr, timeout=min(remaining, 5.0))
            break
        except OSError as e:
            last = e
            time.sleep(min(0.1, remaining))
    ch = TLSChannel(me, sock, ctx, server_side=False, who=who)
    try:
        ch.handshake()
        names = ch.identity()
        if names != {peer}:
            raise PartyError(f"{me}: refused {who}: its certificate is for {sorted(names)}, "
                             f"expected {peer!r}")
        name = ch.hello(session_id)
        if name != peer:
            raise PartyError(f"{me}: refused {who}: it says it is {name!r}, expected {peer!r}")
    except Exception as e:
        ch.close()
        raise _setup_error(me, who, e) from e
    except BaseException:
        ch.close()
        raise
    return ch


def _accept(me: str, listener: socket.socket, ctx: ssl.SSLContext, session_id: bytes,
            deadline: float, waiting: list[str], connect_timeout: float) -> tuple[str, TLSChannel]:
    listener.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        sock, addr = listener.accept()
    except TimeoutError:
        raise PartyError(f"{me}: {waiting} did not connect within {connect_timeout:g} s (not started, "
                         f"or a wrong address or port?)") from None
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    who = f"the party connecting from {addr[0]}:{addr[1]}"
    ch = TLSChannel(me, sock, ctx, server_side=True, who=who)
    try:
        ch.handshake()
        names = ch.identity()
        if len(names) != 1 or next(iter(names)) not in waiting:
            raise PartyError(f"{me}: refused {who}: its certificate is for {sorted(names)}, "
                             f"expected one of {waiting}")
        (cert_name,) = names
        ch.who = f"{cert_name!r} at {addr[0]}:{addr[1]}"
        name = ch.hello(session_id)
        if name != cert_name:
            raise PartyError(f"{me}: refused {ch.who}: it says it is {name!r} but its certificate is "
                             f"for {cert_name!r}")
    except Exception as e:
        ch.close()
        raise _setup_error(me, ch.who, e) from e
    except BaseException:
        ch.close()
        raise
    return cert_name, ch


class TLSTransport(Transport):
    """Messages between parties over TCP with mutual TLS 1.3; build one with :meth:`connect`."""

    def __init__(self, party: str, parties: tuple[str, ...], session_id: bytes,
                 channels: dict[str, TLSChannel], timeout: float) -> None:
        self.party, self.parties, self.session_id = party, parties, session_id
        self.timeout = timeout
        self.stats = TrafficStats()
        self._channels = channels
        self._send_seq = dict.fromkeys(channels, 0)
        self._send_failed: dict[str, str] = {}  # a channel is unusable after a failed send ...
        self._recv_failed: dict[str, str] = {}  # ... or after its reader stopped
        self._closed = False
        for peer, ch in channels.items():
            ch.start(peer, session_id, timeout)

    @classmethod
    def connect(cls, party: str, addresses: Mapping[str, tuple[str, int]], certs_dir: Path,
                session_id: bytes, *, timeout: float = DEFAULT_TIMEOUT_S,
                listen_socket: socket.socket | None = None, connect_timeout: float = 30.0) -> TLSTransport:
        """Connect ``party`` to every other party of ``addresses`` (keys in party order).

        ``listen_socket``, if given, is an already listening socket for ``party`` (it is closed once
        every later party has connected); otherwise one is bound to ``addresses[party]`` (pass your
        own socket to listen elsewhere, e.g. on all interfaces behind NAT). Only parties later in
        the order connect to it, and each must prove its name with a certificate of our CA.
        """
        parties = validate_party_names(list(addresses))
        if party not in parties:
            raise ValueError(f"party {party!r} is not in the address map {list(parties)}")
        if len(session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes, got {len(session_id)}")
        server_ctx, client_ctx = _contexts(load_credentials(certs_dir, party))
        i = parties.index(party)
        deadline = time.monotonic() + connect_timeout
        listener = listen_socket
        channels: dict[str, TLSChannel] = {}
        try:
            if listener is None and parties[i + 1:]:
                host, port = _addr(addresses[party])
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                listener = socket.create_server((host, port), family=family, backlog=len(parties))
            for peer in parties[:i]:
                channels[peer] = _dial(party, peer, _addr(addresses[peer]), client_ctx, session_id,
                                       deadline, connect_timeout)
            waiting = list(parties[i + 1:])
            while waiting:
                assert listener is not None
                peer, ch = _accept(party, listener, server_ctx, session_id, deadline, waiting,
                                   connect_timeout)
                channels[peer] = ch
                waiting.remove(peer)
        except BaseException:
            for ch in channels.values():
                ch.close()
            raise
        finally:
            if listener is not None:
                listener.close()
        return cls(party, parties, session_id, channels, timeout)

    def send(self, to: str, payload: bytes | bytearray | memoryview) -> None:
        self._check_peer(to)
        if self._closed:
            raise PartyError(f"{self.party}: transport is closed")
        if to in self._send_failed:
            raise PartyError(self._send_failed[to])
        view = memoryview(payload).cast("B")
        header = pack_header(self.session_id, self._send_seq[to], view.nbytes)
        try:
            if view.nbytes <= SMALL:
                self._channels[to].write(header + view)
            else:
                self._channels[to].write(header, view)
        except TimeoutError:
            why = (f"{self.party}: {to!r} did not take a message within {self.timeout:g} s (the party "
                   f"died or stalled)")
            self._send_failed[to] = why
            raise PartyError(why) from None
        except (OSError, ssl.SSLError) as e:
            why = f"{self.party}: could not send to {to!r}: {e} (the party died?)"
            self._send_failed[to] = why
            raise PartyError(why) from e
        self._send_seq[to] += 1
        self.stats.record_send(to, HEADER.size + view.nbytes)

    def recv(self, frm: str) -> bytearray:
        self._check_peer(frm)
        if self._closed:
            raise PartyError(f"{self.party}: transport is closed")
        if frm in self._recv_failed:
            raise PartyError(self._recv_failed[frm])
        try:
            item = self._channels[frm].queue.get(timeout=self.timeout)
        except queue.Empty:
            raise PartyError(f"{self.party}: no message from {frm!r} within {self.timeout:g} s "
                             f"(the party died or stalled)") from None
        if isinstance(item, PartyError):
            self._recv_failed[frm] = str(item)
            raise PartyError(str(item))
        self.stats.record_recv(frm, HEADER.size + len(item))
        return item

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for ch in self._channels.values():
                ch.close()
