"""Run a session's parties as separate "hosts" in Linux network namespaces, over a shaped network.

Benchmarks import this module (``from netsim import effective_shape, run_json``; scripts in
``benchmarks/`` have it on ``sys.path``) to time a secure program under a realistic network instead
of loopback; the command line serves manual checks (as root)::

    python benchmarks/netsim.py --check            # availability; measured RTT and TCP goodput, lan and wan
    python benchmarks/netsim.py --shape wan [--json] script.py [ARG ...]   # SCRIPT's main(session, *ARGS)

Shapes (``SHAPES``): ``loopback`` (no namespaces: plain ``veil run``), ``lan`` (0.1 ms one-way
delay, 10 Gbit/s, MTU 9000) and ``wan`` (20 ms one-way delay, 100 Mbit/s, MTU 1500). Where
namespaces are unavailable (not root, no CAP_NET_ADMIN, no ``ip``, ...), :func:`run_parties` says so
on stderr and runs on loopback; label results with :func:`effective_shape`.

Topology. Every party gets a network namespace of its own (``lo`` up, one interface ``veil0`` with
address ``10.77.0.N/24``); a hub namespace connects them. The delay and the rate are applied once,
on the *sending* side of each party's link: a packet from alice to bob waits the shape's delay
exactly once, so the one-way delay between any two parties is the stated delay, a ping's round trip
twice it, and the rate is each party's uplink (the dealer's two streams share its uplink). Two
backends do this, chosen by :func:`network` (``backend="auto"``):

* ``netem``: a veth pair per party into a Linux bridge in the hub namespace, and
  ``tc qdisc add dev veil0 root netem delay D rate R`` on each party's end (egress only).
* ``wire``, where the kernel has no ``sch_netem`` (``CONFIG_NET_SCH_NETEM`` unset, as on some cloud
  and container kernels): a TUN device per party, read and written by a small forwarding process
  of this module ("the wire", running in the hub namespace) that holds each IP packet for the
  serialisation time at the sender's rate plus the delay. TCP runs end to end between the parties'
  kernels, so its dynamics (windows, slow start, ACK clocking) are real. The wire adds ~0.06 ms
  per packet of its own (~0.13 ms per round trip) and moves at most 1 to 2 Gbit/s (one Python
  process): ``lan`` runs that are bandwidth-bound measure the wire, not 10 Gbit/s. Its queues,
  like netem's here (``limit 100000``), do not drop: TCP is bounded by its socket buffers.

The namespaces are named ``veilsimPID-RAND-PARTY`` (and ``...-hub``): parallel runs do not collide
(their subnets are in different namespaces, so the same addresses are fine), and namespaces left by
a run that was killed (its PID gone) are deleted, with any process still in them, when the next
network is set up. Everything is torn down on exit, error, Ctrl-C or SIGTERM.

Results. :func:`run_parties` runs SCRIPT through a generated wrapper whose ``main(session)`` calls
``SCRIPT.main(session, *ARGS)`` (ARGS as strings) and returns the result as the string
``"VEIL-NETSIM-JSON:" + json.dumps(result)`` (tensors through ``.tolist()``, anything else not JSON
through ``repr``). ``veil run`` prints each party's result as ``NAME: repr(result)``;
:func:`parse_result` finds that line, undoes the ``repr`` and the JSON. :func:`run_json` does both.

What the parties see: the namespaces isolate only the network. The file system (``/tmp``, the
certificates, the repository), users and processes are the host's: the certificates and the peers
file are written to one private temporary directory that every party reads. Each party listens on
``10.77.0.N:17000`` of its own namespace. Party processes get ``OMP_NUM_THREADS=1`` (as ``veil run``
gives each local party one torch thread), unless ``threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import fcntl
import functools
import heapq
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

PARTIES = ("alice", "bob", "dealer")
COMPUTE_PARTIES = ("alice", "bob")
RESULT_MARKER = "VEIL-NETSIM-JSON:"
SUBNET = "10.77.0"  # party i gets SUBNET.(i+1)/24, in namespaces of its own
PORT = 17000  # every party listens on this port of its own address
NS_PREFIX = "veilsim"
_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)-[0-9a-f]{{6}}-")
_TMP_PREFIX = "veil-netsim-"  # then PID-: temporary directories of run_parties
_IFACE = "veil0"
_GRACE_S = 10.0  # after a party fails, how long the others get to stop on their own
_SELF = Path(__file__).resolve()


class NetsimError(RuntimeError):
    """Setting up or tearing down the simulated network failed."""


class PartyFailed(RuntimeError):
    """A party exited with an error or did not finish in time; ``party`` names it."""

    def __init__(self, message: str, *, party: str, returncode: int | None, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.party = party
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class Shape:
    """A network: one-way delay between any two parties, and each party's uplink rate."""

    name: str
    delay_s: float = 0.0
    rate_bit_s: float | None = None
    mtu: int = 1500  # of each party's link (TCP's segment size and initial window follow it)
    namespaces: bool = True  # False: all parties on this host's loopback

    def describe(self) -> str:
        if not self.namespaces:
            return f"{self.name} (local loopback, no shaping)"
        rate = "unlimited" if self.rate_bit_s is None else f"{self.rate_bit_s / 1e6:g} Mbit/s"
        return f"{self.name} ({self.delay_s * 1e3:g} ms one-way delay, {rate} per party, MTU {self.mtu})"


SHAPES: dict[str, Shape] = {
    "loopback": Shape("loopback", namespaces=False),
    "lan": Shape("lan", delay_s=0.1e-3, rate_bit_s=10e9, mtu=9000),  # jumbo frames, as in a data centre
    "wan": Shape("wan", delay_s=20e-3, rate_bit_s=100e6, mtu=1500),  # an Internet path
}


def get_shape(shape: str | Shape) -> Shape:
    if isinstance(shape, Shape):
        return shape
    try:
        return SHAPES[shape]
    except KeyError:
        raise ValueError(f"unknown network shape {shape!r}; available: {sorted(SHAPES)}") from None


# ---- ip / tc helpers ----------------------------------------------------------------------------
def _cmd(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetsimError(f"`{' '.join(argv)}` failed: {e}") from None
    if check and r.returncode != 0:
        raise NetsimError(f"`{' '.join(argv)}` failed (exit {r.returncode}): {r.stderr.strip()}")
    return r


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _cmd("ip", *args, check=check)


def _netns_list() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_netns(name: str, *, kill: bool) -> str | None:
    """Delete namespace ``name`` (first SIGKILL the processes in it, if ``kill``); an error or None."""
    if kill:
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    r = _ip("netns", "del", name, check=False)
    if r.returncode != 0 and name in _netns_list():
        return f"ip netns del {name}: {r.stderr.strip()}"
    return None


def cleanup_stale() -> list[str]:
    """Delete what netsim runs whose process is gone left behind: their namespaces (killing what
    still runs in them) and their temporary directories (certificates, peers file, logs)."""
    removed = []
    for name in _netns_list():
        m = _NS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))) and _delete_netns(name, kill=True) is None:
            removed.append(name)
    for path in Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*"):
        m = re.match(rf"{_TMP_PREFIX}(\d+)-", path.name)
        if m and path.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _has_cap_net_admin() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return os.geteuid() == 0
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    return bool(m and int(m.group(1), 16) & (1 << 12))  # CAP_NET_ADMIN = 12


@dataclass(frozen=True)
class _Probe:
    ok: bool
    reason: str
    backends: tuple[str, ...] = ()


@functools.cache
def _probe() -> _Probe:
    if not sys.platform.startswith("linux"):
        return _Probe(False, f"not Linux ({sys.platform})")
    if shutil.which("ip") is None:
        return _Probe(False, "`ip` (iproute2) not found")
    if not _has_cap_net_admin():
        return _Probe(False, "no CAP_NET_ADMIN" if os.geteuid() == 0 else "not root (no CAP_NET_ADMIN)")
    name = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", name)
    except NetsimError as e:
        return _Probe(False, f"cannot create a network namespace: {e}")
    try:
        try:
            _ip("-n", name, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1")
            _ip("-n", name, "link", "set", "v0", "up")
        except NetsimError as e:
            return _Probe(False, f"cannot create a veth pair: {e}")
        backends = []
        if shutil.which("tc") is None:
            netem_why = "`tc` not found"
        else:
            r = _cmd("tc", "-n", name, "qdisc", "add", "dev", "v0", "root", "netem", "delay", "1ms", "rate",
                     "1gbit", check=False)
            netem_why = r.stderr.strip() or f"exit {r.returncode}"
            if r.returncode == 0:
                backends.append("netem")
        if Path("/dev/net/tun").exists() and _ip("-n", name, "tuntap", "add", "mode", "tun", "name", "t0",
                                                  check=False).returncode == 0:
            backends.append("wire")
            _ip("-n", name, "tuntap", "del", "mode", "tun", "name", "t0", check=False)
        if not backends:
            return _Probe(False, f"tc netem unavailable ({netem_why}) and no TUN device")
        if backends[0] == "netem":
            return _Probe(True, "kernel tc netem", tuple(backends))
        return _Probe(True, f"userspace TUN wire (tc netem unavailable: {netem_why})", tuple(backends))
    finally:
        _delete_netns(name, kill=False)


def namespaces_available() -> tuple[bool, str]:
    """Whether :func:`network` can run here, and why (not) or with which backend.

    Tries once per process to create a throwaway namespace with a veth pair, a netem qdisc, and a
    TUN device (the fallback when the kernel lacks netem), and deletes it.
    """
    p = _probe()
    return p.ok, p.reason


# ---- the network ------------------------------------------------------------------------------
@dataclass
class Network:
    """A live simulated network: each party's namespace (None on loopback) and IPv4 address."""

    shape: Shape
    parties: tuple[str, ...]
    backend: str  # "netem", "wire" or "loopback"
    namespaces: dict[str, str | None] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    def argv(self, party: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``party``'s namespace (``ip netns exec NS ...``)."""
        ns = self.namespaces[party]
        return list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]


@contextlib.contextmanager
def _signals_as_exit() -> Iterator[None]:
    """In the main thread, turn SIGTERM (when nobody handles it) into SystemExit, so that the
    ``finally`` of :func:`network` runs when a benchmark is terminated."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while tearing down (delivered afterwards); main thread only."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def network(shape: str | Shape, parties: Sequence[str] = PARTIES, *, backend: str = "auto") -> Iterator[Network]:
    """Create one namespace per party, connected and shaped as ``shape``; tear it all down on exit.

    ``backend``: ``"auto"`` (netem where the kernel has it, else the userspace wire), ``"netem"`` or
    ``"wire"``. The ``loopback`` shape creates nothing (addresses 127.0.0.1). NetsimError when
    namespaces are unavailable (see :func:`namespaces_available`) or a step fails.
    """
    sh = get_shape(shape)
    names = tuple(parties)
    if len(set(names)) != len(names) or not 2 <= len(names) <= 250:
        raise ValueError(f"parties must be 2 to 250 distinct names, got {names}")
    if not sh.namespaces:
        yield Network(sh, names, "loopback", dict.fromkeys(names), dict.fromkeys(names, "127.0.0.1"))
        return
    probe = _probe()
    if not probe.ok:
        raise NetsimError(f"network namespaces unavailable ({probe.reason})")
    chosen = probe.backends[0] if backend == "auto" else backend
    if chosen not in ("netem", "wire"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'netem' or 'wire'")
    if chosen not in probe.backends:
        raise NetsimError(f"backend {chosen!r} unavailable here ({probe.reason})")
    cleanup_stale()
    run_id = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    hub = f"{run_id}-hub"
    net = Network(sh, names, chosen, {p: f"{run_id}-{p}" for p in names},
                  {p: f"{SUBNET}.{i + 1}" for i, p in enumerate(names)})
    created: list[str] = []
    wire: subprocess.Popen[bytes] | None = None
    with _signals_as_exit():
        try:
            for ns in (hub, *(n for n in net.namespaces.values() if n is not None)):
                _ip("netns", "add", ns)
                created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            if chosen == "netem":
                _setup_netem(net, hub)
            else:
                wire = _start_wire(net, hub)
                _setup_wire(net, hub, wire)
            yield net
        finally:
            with _signals_deferred():
                errors = _teardown(created, wire)
            if errors:
                print("netsim: teardown problems:\n  " + "\n  ".join(errors), file=sys.stderr)


def _setup_netem(net: Network, hub: str) -> None:
    _ip("-n", hub, "link", "add", "name", "br0", "type", "bridge")
    _ip("-n", hub, "link", "set", "br0", "up")
    sh = net.shape
    for i, party in enumerate(net.parties):
        ns = net.namespaces[party]
        assert ns is not None
        _ip("-n", hub, "link", "add", "name", f"p{i}", "type", "veth", "peer", "name", _IFACE, "netns", ns)
        _ip("-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{net.addresses[party]}/24", "dev", _IFACE)
        _ip("-n", hub, "link", "set", f"p{i}", "mtu", str(sh.mtu))
        _ip("-n", ns, "link", "set", _IFACE, "mtu", str(sh.mtu), "up")
        netem = []
        if sh.delay_s > 0:
            netem += ["delay", f"{sh.delay_s * 1e6:.0f}us"]
        if sh.rate_bit_s is not None:
            netem += ["rate", f"{sh.rate_bit_s:.0f}bit"]
        if netem:  # egress of the sender only: one delay per one-way trip
            _cmd("tc", "-n", ns, "qdisc", "add", "dev", _IFACE, "root", "netem", *netem, "limit", "100000")


def _start_wire(net: Network, hub: str) -> subprocess.Popen[bytes]:
    sh = net.shape
    argv = [sys.executable, str(_SELF), "_wire", "--delay", repr(sh.delay_s),
            "--rate", "0" if sh.rate_bit_s is None else repr(sh.rate_bit_s), "--count", str(len(net.parties))]
    wire = subprocess.Popen(["ip", "netns", "exec", hub, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert wire.stdout is not None
    ready, _, _ = select.select([wire.stdout], [], [], 20.0)
    line = wire.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        wire.kill()
        _, err = wire.communicate(timeout=5)
        raise NetsimError(f"the wire process did not start: {err.decode(errors='replace').strip() or line!r}")
    return wire


def _setup_wire(net: Network, hub: str, wire: subprocess.Popen[bytes]) -> None:
    for i, party in enumerate(net.parties):
        ns = net.namespaces[party]
        assert ns is not None
        _ip("-n", hub, "link", "set", f"t{i}", "netns", ns)
        _ip("-n", ns, "link", "set", f"t{i}", "name", _IFACE)
        _ip("-n", ns, "link", "set", _IFACE, "mtu", str(net.shape.mtu), "txqueuelen", "10000", "up")
        _ip("-n", ns, "addr", "add", f"{net.addresses[party]}/24", "dev", _IFACE)
    if wire.poll() is not None:
        raise NetsimError(f"the wire process exited (code {wire.returncode})")


def _teardown(created: list[str], wire: subprocess.Popen[bytes] | None) -> list[str]:
    errors = []
    if wire is not None:
        with contextlib.suppress(OSError):
            assert wire.stdin is not None
            wire.stdin.close()  # the wire stops at EOF on its stdin
        try:
            wire.wait(timeout=5)
        except subprocess.TimeoutExpired:
            wire.kill()
            wire.wait()
        err = wire.stderr.read().decode(errors="replace").strip() if wire.stderr else ""
        if wire.returncode not in (0, -signal.SIGKILL) and err:
            errors.append(f"wire process (exit {wire.returncode}): {err}")
    for ns in reversed(created):
        try:
            problem = _delete_netns(ns, kill=True)
        except NetsimError as e:
            problem = str(e)
        if problem:
            errors.append(problem)
    return errors


# ---- the wire (TUN backend): runs in the hub namespace --------------------------------------
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def _wire_main(argv: Sequence[str]) -> int:
    """``netsim.py _wire``: create TUN devices t0..tN-1 here, print ``ready``, forward until stdin EOF.

    Packet from party i to party j (destination ``SUBNET.(j+1)``): it leaves i's link once the
    packets before it have (serialisation at ``--rate`` bit/s; 0 = unlimited), then arrives at j
    ``--delay`` seconds later. Other packets (IPv6, unknown destinations) are dropped.
    """
    ap = argparse.ArgumentParser(prog="netsim.py _wire")
    ap.add_argument("--delay", type=float, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--count", type=int, required=True)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (stdin EOF)
    with contextlib.suppress(OSError, AttributeError):  # exact timers: 1 ns slack instead of 50 us
        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    fds = [_open_tun(f"t{i}") for i in range(a.count)]
    by_addr = {socket.inet_aton(f"{SUBNET}.{i + 1}"): fd for i, fd in enumerate(fds)}
    src_of = {fd: i for i, fd in enumerate(fds)}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    heap: list[tuple[float, int, int, bytes]] = []
    free_at = [0.0] * len(fds)  # when each sender's link is free again
    seq = 0
    control = sys.stdin.fileno()
    watched = [control, *fds]
    while True:
        timeout = None if not heap else max(0.0, heap[0][0] - time.monotonic())
        ready, _, _ = select.select(watched, [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == control:
                if not os.read(control, 4096):
                    return 0
                continue
            src = src_of[fd]
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                dst = by_addr.get(pkt[16:20]) if len(pkt) >= 20 and pkt[0] >> 4 == 4 else None
                if dst is None:
                    continue
                sent = max(now, free_at[src]) + (len(pkt) * 8 / a.rate if a.rate > 0 else 0.0)
                free_at[src] = sent
                heapq.heappush(heap, (sent + a.delay, seq, dst, pkt))
                seq += 1
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(heap)
            with contextlib.suppress(OSError):  # a full receive queue drops, like a real link
                os.write(dst, pkt)


# ---- running parties ----------------------------------------------------------------------------
_WRAPPER = '''\
"""Generated by benchmarks/netsim.py: main(session) = SCRIPT.main(session, *ARGS), result as JSON."""
import json
from pathlib import Path

from veil.mpc.runtime import load_program

SCRIPT = Path({script!r})
ARGS = json.loads({args!r})


def _jsonable(obj):
    tolist = getattr(obj, "tolist", None)
    return tolist() if callable(tolist) else repr(obj)


def main(session):
    result = load_program(SCRIPT)(session, *ARGS)
    return {marker!r} + json.dumps(result, default=_jsonable)
'''


def _write_wrapper(directory: Path, script: Path, args: Sequence[str]) -> Path:
    path = directory / "netsim_program.py"
    path.write_text(_WRAPPER.format(script=str(script), args=json.dumps(list(args)), marker=RESULT_MARKER))
    return path


def _veil_argv() -> list[str]:
    """How to call the ``veil`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("veil")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "veil.cli.main"]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running (killed)"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process this module started (and its process group, which it leads)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_processes(commands: Mapping[str, list[str]], *, timeout: float, env: Mapping[str, str],
                   logs: Path) -> dict[str, str]:
    """Start every command at once, wait for all; ``{name: stdout}``, or PartyFailed naming the
    first one that failed (the others get ``_GRACE_S`` to stop on their own, then are killed)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files: dict[str, tuple[BinaryIO, BinaryIO]] = {}
    failed: list[str] = []
    timed_out: list[str] = []
    try:
        for name, argv in commands.items():
            files[name] = (open(logs / f"{name}.out", "w+b"), open(logs / f"{name}.err", "w+b"))
            procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=files[name][0],
                                           stderr=files[name][1], env=dict(env), start_new_session=True)
        deadline = time.monotonic() + timeout
        give_up: float | None = None
        while True:
            running = [n for n, p in procs.items() if p.poll() is None]
            failed += [n for n, p in procs.items() if p.returncode not in (None, 0) and n not in failed]
            if not running:
                break
            now = time.monotonic()
            if failed and give_up is None:
                give_up = min(now + _GRACE_S, deadline)
            if now >= deadline or (give_up is not None and now >= give_up):
                timed_out = [] if failed else running
                break
            time.sleep(0.02)
    finally:
        for p in procs.values():
            _stop(p)
        outputs: dict[str, tuple[str, str]] = {}
        for name, (out, err) in files.items():
            out.seek(0)
            err.seek(0)
            outputs[name] = (out.read().decode(errors="replace"), err.read().decode(errors="replace"))
            out.close()
            err.close()
    if failed or timed_out:
        culprit = failed[0] if failed else timed_out[0]
        stdout, stderr = outputs[culprit]
        others = [f"{n} ({_describe_exit(procs[n].returncode)})" for n in procs
                  if n != culprit and procs[n].returncode != 0]
        if failed:
            head = f"party {culprit} failed ({_describe_exit(procs[culprit].returncode)})"
        else:
            who = ("party " if len(timed_out) == 1 else "parties ") + ", ".join(timed_out)
            head = f"{who} did not finish within {timeout:g} s (killed)"
        msg = head + (f"; also: {', '.join(others)}" if others else "") + \
            f"\n--- stderr of {culprit} (last lines) ---\n{_tail(stderr) or '(empty)'}"
        raise PartyFailed(msg, party=culprit, returncode=procs[culprit].returncode, stdout=stdout, stderr=stderr)
    return {name: out for name, (out, _) in outputs.items()}


_warned = False


def effective_shape(shape: str | Shape) -> Shape:
    """``shape``, or ``loopback`` when it needs namespaces and they are unavailable here (saying so on
    stderr, once per process). Benchmarks label their results with this shape's name."""
    global _warned
    sh = get_shape(shape)
    if sh.namespaces:
        ok, reason = namespaces_available()
        if not ok:
            if not _warned:
                print(f"network namespaces unavailable ({reason}); running on loopback", file=sys.stderr)
                _warned = True
            return SHAPES["loopback"]
    return sh


def run_parties(script: Path, args: Sequence[str], shape: str | Shape, *, timeout: float, backend: str = "auto",
                threads: int | None = 1, veil_timeout: float | None = None) -> dict[str, str]:
    """Run ``script``'s ``main(session, *args)`` as a 3-party session over ``shape``; each party's stdout.

    Over ``lan``/``wan``: fresh certificates (``veil.net.certs.generate_certificates``) and a peers
    file (``veil.net.peers.write_peers``) in a temporary directory, then ``veil run WRAPPER --party
    NAME --peers FILE`` for alice, bob and the dealer at once, each in its namespace; returns
    ``{"alice": ..., "bob": ..., "dealer": ...}``. Over ``loopback`` (or when namespaces are
    unavailable: a message on stderr, then loopback): one ``veil run WRAPPER``, whose stdout (all
    results) is returned as ``{"alice": out, "bob": out}`` (the dealer's result is not printed).
    Each party's stdout has a line ``NAME: ...`` for :func:`parse_result`.

    ``timeout``: seconds for the whole run; also the parties' wait for a message unless
    ``veil_timeout`` is given. ``threads``: OMP_NUM_THREADS of each party (None: torch's default).
    PartyFailed names the failing party, with its stderr.
    """
    script = Path(script).resolve()
    if not script.is_file():
        raise FileNotFoundError(f"no such script: {script}")
    sh = effective_shape(shape)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    per_message = f"{veil_timeout if veil_timeout is not None else timeout:g}"
    with tempfile.TemporaryDirectory(prefix=f"{_TMP_PREFIX}{os.getpid()}-") as tmp:
        tmpdir = Path(tmp)
        wrapper = _write_wrapper(tmpdir, script, args)
        veil = [*_veil_argv(), "run", str(wrapper), "--timeout", per_message]
        if not sh.namespaces:
            out = _run_processes({"loopback": veil}, timeout=timeout, env=env, logs=tmpdir)["loopback"]
            return dict.fromkeys(COMPUTE_PARTIES, out)
        from veil.net.certs import generate_certificates
        from veil.net.peers import write_peers

        generate_certificates(PARTIES, tmpdir / "certs")
        with network(sh, PARTIES, backend=backend) as net:
            peers = tmpdir / "peers.json"
            write_peers(peers, {p: (net.addresses[p], PORT) for p in PARTIES}, certs_dir=tmpdir / "certs")
            commands = {p: net.argv(p, [*veil, "--party", p, "--peers", str(peers)]) for p in PARTIES}
            return _run_processes(commands, timeout=timeout, env=env, logs=tmpdir)


def parse_result(stdout: str, party: str) -> Any:
    """The result ``party`` printed (its last line ``PARTY: repr(result)``), decoded from JSON when it
    came through the wrapper of :func:`run_parties`, else as a Python literal. ValueError if none."""
    prefix = f"{party}: "
    for line in reversed(stdout.splitlines()):
        if not line.startswith(prefix):
            continue
        text = line[len(prefix):]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"party {party}: result is not a Python literal: {text[:200]}") from None
        if isinstance(value, str) and value.startswith(RESULT_MARKER):
            return json.loads(value[len(RESULT_MARKER):])
        return value
    raise ValueError(f"party {party}: no line {prefix!r}... in its output:\n{_tail(stdout, 10)}")


def run_json(script: Path, args: Sequence[str], shape: str | Shape, *, timeout: float,
             **kwargs: Any) -> dict[str, Any]:
    """:func:`run_parties`, then each party's result (``{"alice": ..., "bob": ...[, "dealer": ...]}``)."""
    outputs = run_parties(script, args, shape, timeout=timeout, **kwargs)
    return {party: parse_result(out, party) for party, out in outputs.items()}


# ---- RTT check (UDP echo; no ping needed) ------------------------------------------------------
def _echo_main(argv: Sequence[str]) -> int:
    """``netsim.py _echo HOST PORT``: echo UDP datagrams until ``stop`` or 30 s of silence."""
    host, port = argv[0], int(argv[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, port))
        s.settimeout(30.0)
        while True:
            try:
                data, peer = s.recvfrom(2048)
            except TimeoutError:
                return 1
            if data == b"stop":
                return 0
            s.sendto(data, peer)


def _ping_main(argv: Sequence[str]) -> int:
    """``netsim.py _ping HOST PORT COUNT``: print COUNT round-trip times (s, JSON) to an echo."""
    host, port, count = argv[0], int(argv[1]), int(argv[2])
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        start = time.monotonic()
        i = 0
        while len(rtts) < count + 1:  # the first, which waits for the echo to start, is dropped
            if time.monotonic() - start > 30:
                print(f"no echo from {host}:{port}", file=sys.stderr)
                return 1
            msg = f"{i}".encode()
            i += 1
            t0 = time.perf_counter()
            s.sendto(msg, (host, port))
            try:
                while s.recv(2048) != msg:
                    pass
            except TimeoutError:
                continue
            rtts.append(time.perf_counter() - t0)
            time.sleep(0.02)
        s.sendto(b"stop", (host, port))
    print(json.dumps(rtts[1:]))
    return 0


def measure_rtt(net: Network, a: str, b: str, *, count: int = 20) -> list[float]:
    """Round-trip times (seconds) of ``count`` UDP pings from ``a`` to ``b`` (a Python echo in ``b``)."""
    host = net.addresses[b]
    port = PORT + 1
    echo = subprocess.Popen(net.argv(b, [sys.executable, str(_SELF), "_echo", host, str(port)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        r = subprocess.run(net.argv(a, [sys.executable, str(_SELF), "_ping", host, str(port), str(count)]),
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise NetsimError(f"ping {a} -> {b} failed: {r.stderr.strip()}")
        return [float(x) for x in json.loads(r.stdout)]
    finally:
        _stop(echo)


def _sink_main(argv: Sequence[str]) -> int:
    """``netsim.py _sink HOST PORT``: accept one TCP connection, read to EOF, reply the byte count."""
    with socket.create_server((argv[0], int(argv[1]))) as srv:
        srv.settimeout(30.0)
        conn, _ = srv.accept()
        with conn:
            total = 0
            while chunk := conn.recv(1 << 20):
                total += len(chunk)
            conn.sendall(struct.pack("!Q", total))
    return 0


def _source_main(argv: Sequence[str]) -> int:
    """``netsim.py _source HOST PORT NBYTES``: send NBYTES, print the seconds until the sink's reply."""
    host, port, nbytes = argv[0], int(argv[1]), int(argv[2])
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    block = b"\0" * (1 << 20)
    with sock:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= sock.send(block[:left])
        sock.shutdown(socket.SHUT_WR)
        reply = sock.recv(8)
        seconds = time.perf_counter() - t0
    if len(reply) != 8 or struct.unpack("!Q", reply)[0] != nbytes:
        print("sink reported a different byte count", file=sys.stderr)
        return 1
    print(json.dumps(seconds))
    return 0


def measure_throughput(net: Network, a: str, b: str, *, nbytes: int) -> float:
    """TCP goodput (bit/s) of one ``nbytes`` transfer from ``a`` to ``b`` (handshake and slow start
    included: make it a few seconds' worth)."""
    host, port = net.addresses[b], PORT + 2
    sink = subprocess.Popen(net.argv(b, [sys.executable, str(_SELF), "_sink", host, str(port)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        r = subprocess.run(net.argv(a, [sys.executable, str(_SELF), "_source", host, str(port), str(nbytes)]),
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise NetsimError(f"transfer {a} -> {b} failed: {r.stderr.strip()}")
        return nbytes * 8 / float(json.loads(r.stdout))
    finally:
        _stop(sink)


# ---- command line -----------------------------------------------------------------------------
def _check(backend: str) -> int:
    ok, reason = namespaces_available()
    print(f"network namespaces: {'available' if ok else 'unavailable'} ({reason})")
    if not ok:
        return 1
    for name in ("lan", "wan"):
        sh = SHAPES[name]
        with network(sh, COMPUTE_PARTIES, backend=backend) as net:
            ms = sorted(t * 1e3 for t in measure_rtt(net, "alice", "bob"))
            rate = sh.rate_bit_s or 1e9
            goodput = measure_throughput(net, "alice", "bob", nbytes=int(min(rate * 3 / 8, 500e6)))
        print(f"{sh.describe()}, backend {net.backend}:\n"
              f"  alice->bob RTT (UDP echo) min {ms[0]:.3f} ms, median {statistics.median(ms):.3f} ms, "
              f"max {ms[-1]:.3f} ms (expected ~{2 * sh.delay_s * 1e3:g} ms + ~0.1 ms for the Python echo"
              f"{' + ~0.13 ms for the wire' if net.backend == 'wire' else ''})\n"
              f"  alice->bob TCP goodput {goodput / 1e6:.0f} Mbit/s (link rate {rate / 1e6:g} Mbit/s)")
    left = [n for n in _netns_list() if n.startswith(f"{NS_PREFIX}{os.getpid()}-")]
    print("namespaces left behind: " + (", ".join(left) if left else "none"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    internal = {"_wire": _wire_main, "_echo": _echo_main, "_ping": _ping_main, "_sink": _sink_main,
                "_source": _source_main}
    if argv and argv[0] in internal:
        return internal[argv[0]](argv[1:])
    ap = argparse.ArgumentParser(
        prog="netsim.py", description="Run a veil script's parties in network namespaces over a shaped network.")
    ap.add_argument("--check", action="store_true", help="report availability and measure lan/wan RTT")
    ap.add_argument("--shape", default="wan", choices=sorted(SHAPES), help="network shape (default wan)")
    ap.add_argument("--backend", default="auto", choices=["auto", "netem", "wire"])
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run (default 600)")
    ap.add_argument("--json", action="store_true", help="print each party's result as a JSON line")
    ap.add_argument("script", nargs="?", type=Path, help="a Python file defining main(session, *args)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for main, as strings")
    a = ap.parse_args(argv)
    if not a.check and a.script is None:
        ap.error("give a script, or --check")
    try:
        with _signals_as_exit():
            if a.check:
                return _check(a.backend)
            outputs = run_parties(a.script, a.args, a.shape, timeout=a.timeout, backend=a.backend)
    except (PartyFailed, NetsimError, ValueError, OSError) as e:
        print(f"netsim: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("netsim: interrupted", file=sys.stderr)
        return 130
    if a.json:
        for party, out in outputs.items():
            print(json.dumps({"party": party, "shape": effective_shape(a.shape).name,
                              "result": parse_result(out, party)}))
    elif len(set(outputs.values())) == 1:  # loopback: one process printed every result
        print(next(iter(outputs.values())).rstrip())
    else:
        for party, out in outputs.items():
            print(f"=== {party} ===\n{out.rstrip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
