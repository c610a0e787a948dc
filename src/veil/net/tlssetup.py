"""Connection set-up of the TLS transport: TLS 1.3 contexts, dialing and accepting every peer, and
the checks of certificate names and hellos (see :mod:`veil.net.tls` for the security properties).

Every party listens on its own address and dials every other party (retrying until
``connect_timeout``): two connections per pair, one per direction, each written by the party that
dialed it and read by the one that accepted it (see :mod:`veil.net.tlschannel`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from veil.net.certs import Credentials, load_credentials, validate_party_names
from veil.net.tlschannel import Incoming, Outgoing, PeerClosed, end_tls, identity, new_hello, read_hello
from veil.net.transport import SESSION_ID_BYTES, PartyError


def tls_contexts(creds: Credentials) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts: TLS 1.3 only, peer certificate required, our CA the only anchor."""
    contexts = []
    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # party names are checked after the handshake (CN and SAN)
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(creds.ca))
        except (ssl.SSLError, OSError) as e:
            raise PartyError(f"{creds.ca}: not a readable CA certificate in PEM ({_ssl_reason(e)})") from None
        try:
            ctx.load_cert_chain(str(creds.cert), str(creds.key))
        except (ssl.SSLError, OSError) as e:
            problem = ("the private key does not belong to the certificate" if "KEY_VALUES_MISMATCH" in str(e)
                       else f"not a readable PEM certificate and private key ({_ssl_reason(e)})")
            raise PartyError(f"{creds.cert} / {creds.key}: {problem}") from None
        contexts.append(ctx)
    contexts[0].num_tickets = 0  # no session resumption
    return contexts[0], contexts[1]


def _ssl_reason(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or getattr(e, "strerror", None) or e)


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


def _handshake(tls: ssl.SSLSocket) -> None:
    tls.do_handshake()


@contextlib.contextmanager
def _setup_guard(me: str, tls: ssl.SSLSocket, who: list[str]) -> Iterator[None]:
    """Close ``tls`` on any failure during set-up and report it as a PartyError naming ``who[0]``."""
    try:
        yield
    except BaseException as e:
        tls.close()
        if isinstance(e, Exception):
            raise _setup_error(me, who[0], e) from e
        raise


def _wrap(sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, deadline: float) -> ssl.SSLSocket:
    """A TLS socket over ``sock`` (no handshake yet), with set-up bounded by ``deadline``."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        return ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise


def _dial(me: str, peer: str, addr: tuple[str, int], ctx: ssl.SSLContext, session_id: bytes,
          deadline: float, connect_timeout: float) -> Outgoing:
    """Connect to ``peer``, check its certificate names it, send our hello."""
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
    tls = _wrap(sock, ctx, False, deadline)
    with _setup_guard(me, tls, [who]):
        _handshake(tls)
        names = identity(tls)
        if names != {peer}:
            raise PartyError(f"{me}: refused {who}: its certificate is for {sorted(names)}, "
                             f"expected {peer!r}")
        hello, key = new_hello(me, session_id)
        tls.sendall(hello)
        plain = end_tls(tls)
    return Outgoing(me, peer, plain, key)


def _accept_one(me: str, listener: socket.socket, ctx: ssl.SSLContext, session_id: bytes,
                deadline: float, waiting: list[str], connect_timeout: float) -> Incoming:
    """Accept one peer's connection, check its certificate and hello."""
    listener.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        sock, addr = listener.accept()
    except TimeoutError:
        raise PartyError(f"{me}: {waiting} did not connect within {connect_timeout:g} s (not started, "
                         f"or a wrong address or port?)") from None
    who = [f"the party connecting from {addr[0]}:{addr[1]}"]  # named once its certificate is read
    tls = _wrap(sock, ctx, True, deadline)
    with _setup_guard(me, tls, who):
        _handshake(tls)
        names = identity(tls)
        if len(names) != 1 or next(iter(names)) not in waiting:
            raise PartyError(f"{me}: refused {who[0]}: its certificate is for {sorted(names)}, "
                             f"expected one of {waiting}")
        (cert_name,) = names
        who[0] = f"{cert_name!r} at {addr[0]}:{addr[1]}"
        name, key = read_hello(me, who[0], tls, session_id)
        if name != cert_name:
            raise PartyError(f"{me}: refused {who[0]}: it says it is {name!r} but its certificate is "
                             f"for {cert_name!r}")
        plain = end_tls(tls)
    return Incoming(me, cert_name, repr(cert_name), plain, key)


def connect_channels(party: str, addresses: Mapping[str, tuple[str, int]], certs_dir: Path, session_id: bytes,
                     listen_socket: socket.socket | None, connect_timeout: float
                     ) -> tuple[tuple[str, ...], dict[str, Outgoing], dict[str, Incoming]]:
    """The parties in order, our outgoing and our incoming channel to every other party (see
    :meth:`veil.net.tls.TLSTransport.connect`)."""
    parties = validate_party_names(list(addresses))
    if party not in parties:
        raise ValueError(f"party {party!r} is not in the address map {list(parties)}")
    if len(session_id) != SESSION_ID_BYTES:
        raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes, got {len(session_id)}")
    server_ctx, client_ctx = tls_contexts(load_credentials(certs_dir, party))
    peers = [p for p in parties if p != party]
    deadline = time.monotonic() + connect_timeout
    listener = listen_socket
    if listener is None:
        host, port = _addr(addresses[party])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family, backlog=len(parties))
    incoming: dict[str, Incoming] = {}
    outgoing: dict[str, Outgoing] = {}
    accept_error: list[BaseException] = []

    def accept_all() -> None:
        waiting = list(peers)
        try:
            while waiting:
                ch = _accept_one(party, listener, server_ctx, session_id, deadline, waiting,
                                 connect_timeout)
                incoming[ch.peer] = ch
                waiting.remove(ch.peer)
        except BaseException as e:
            accept_error.append(e)

    acceptor = threading.Thread(target=accept_all, daemon=True, name=f"veil-{party}-accept")
    acceptor.start()
    try:
        try:
            for peer in peers:
                outgoing[peer] = _dial(party, peer, _addr(addresses[peer]), client_ctx, session_id,
                                       deadline, connect_timeout)
        except PartyError:
            # The peer may have refused our hello; our own check of its hello names the cause.
            acceptor.join(min(2.0, max(deadline - time.monotonic(), 0.0)))
            if accept_error and "refused" in str(accept_error[0]):
                raise accept_error[0] from None
            raise
        acceptor.join(max(deadline - time.monotonic(), 0.0) + 1.0)
        if accept_error:
            raise accept_error[0]
        if acceptor.is_alive() or len(incoming) != len(peers):
            missing = sorted(set(peers) - set(incoming))
            raise PartyError(f"{party}: {missing} did not connect within {connect_timeout:g} s")
    except BaseException:
        opened: list[Outgoing | Incoming] = [*outgoing.values(), *incoming.values()]
        for ch in opened:
            ch.close()
        with contextlib.suppress(OSError):
            listener.close()
        acceptor.join(2.0)
        raise
    listener.close()
    return parties, outgoing, incoming
