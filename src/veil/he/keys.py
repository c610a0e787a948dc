"""CKKS parameters, keys and the files that carry them (Microsoft SEAL, through TenSEAL's ``sealapi``).

The client makes every key (:func:`keygen`). Two files come out:

* the **client key file** (mode 0600): parameters and the secret key; it never leaves the client;
* the **server key file**: parameters, public key, relinearisation key and the Galois (rotation)
  keys of the steps the model needs, nothing secret.

Both files start with a JSON header: the format, the parameters, the security level (checked
against the homomorphic-encryption standard's table for 128-bit classical security, the same table
SEAL enforces), a key id (SHA-256 of the public key) and a SHA-256 of every blob. A file whose
blobs do not match their digests, or keys of another key id, is refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from veil.he.models import HEError

# Largest total coefficient-modulus bits for 128-bit classical security, by ring dimension
# (HomomorphicEncryption.org standard, 2018; SEAL's CoeffModulus::MaxBitCount at tc128).
MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAGIC = b"VEILHE1\n"


@dataclass(frozen=True)
class HEParams:
    """CKKS parameters: ring dimension ``N`` (``N / 2`` slots), the prime sizes of the coefficient
    modulus (first and last hold the integer part and key switching; each middle one is one level,
    ``scale_bits`` wide), and the scale ``2^scale_bits``."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (38, 28, 28, 28, 28, 28, 38)
    scale_bits: int = 28

    def __post_init__(self) -> None:
        n, bits = self.poly_modulus_degree, tuple(int(b) for b in self.coeff_mod_bit_sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if n not in MAX_BITS_128:
            raise HEError(f"poly_modulus_degree must be one of {sorted(MAX_BITS_128)}, got {n}")
        if len(bits) < 3 or any(not 20 <= b <= 60 for b in bits):
            raise HEError(f"coeff_mod_bit_sizes: at least 3 primes of 20..60 bits, got {list(bits)}")
        if sum(bits) > MAX_BITS_128[n]:
            raise HEError(f"{sum(bits)} bits of coefficient modulus at N={n} give less than 128-bit security "
                          f"(at most {MAX_BITS_128[n]} bits): use fewer or smaller primes, or a larger N")
        if any(b != self.scale_bits for b in bits[1:-1]):
            raise HEError(f"the middle primes must equal scale_bits ({self.scale_bits}), got {list(bits[1:-1])}")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Multiplicative levels (rescalings) available."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def security_bits(self) -> int:
        return 128

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
                "security_bits": self.security_bits}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HEParams:
        try:
            return cls(int(d["poly_modulus_degree"]), tuple(d["coeff_mod_bit_sizes"]), int(d["scale_bits"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, HEError):
                raise
            raise HEError(f"malformed parameters {d!r}: {e}") from None


def seal_context(params: HEParams) -> Any:
    import tenseal.sealapi as seal

    p = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    p.set_poly_modulus_degree(params.poly_modulus_degree)
    p.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    ctx = seal.SEALContext(p, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise HEError(f"SEAL refuses the parameters {params.as_dict()}: {ctx.parameters_error_message()}")
    return ctx


# ---- blobs: SEAL objects <-> bytes (sealapi saves to paths only) -------------------------------------
def to_bytes(obj: Any) -> bytes:
    fd, name = tempfile.mkstemp(prefix="veil-he-")
    os.close(fd)
    try:
        obj.save(name)
        return Path(name).read_bytes()
    finally:
        os.unlink(name)


def from_bytes(kind: Any, ctx: Any, data: bytes, what: str) -> Any:
    fd, name = tempfile.mkstemp(prefix="veil-he-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        obj = kind()
        try:
            obj.load(ctx, name)
        except (RuntimeError, ValueError) as e:
            raise HEError(f"{what}: not valid for these parameters ({e})") from None
        return obj
    finally:
        os.unlink(name)


# ---- containers: the format of key files, ciphertext files and network messages ------------------
def pack_container(header: dict[str, Any], blobs: dict[str, bytes]) -> bytes:
    """``MAGIC``, a length-prefixed JSON header (with each blob's size and SHA-256), then the blobs
    in name order."""
    header = {**header, "blobs": {k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()}
                                  for k, v in blobs.items()}}
    head = json.dumps(header, sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack(">I", len(head)), head, *(blobs[k] for k in sorted(blobs))])


def unpack_container(data: bytes, kind: str | tuple[str, ...], where: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Header and blobs of :func:`pack_container`'s ``data``, checked: the magic, the kind (one of
    ``kind``), every blob against its digest, no trailing bytes. ``where`` names the source in errors."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise HEError(f"{where}: not a Veil HE file")
    (n,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HEError(f"{where}: damaged header") from None
    if not isinstance(header, dict) or header.get("kind") not in kinds:
        got = header.get("kind") if isinstance(header, dict) else None
        raise HEError(f"{where}: a {got or 'unknown'} file, expected a {' or '.join(kinds)} file")
    blobs, pos = {}, start + n
    try:
        for name, meta in sorted(header.get("blobs", {}).items()):
            size = int(meta["size"])
            blob = data[pos:pos + size]
            pos += size
            if len(blob) != size or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                raise HEError(f"{where}: {name} does not match its digest (truncated or tampered with)")
            blobs[name] = blob
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, HEError):
            raise
        raise HEError(f"{where}: damaged header ({e})") from None
    if pos != len(data):
        raise HEError(f"{where}: {len(data) - pos} trailing bytes (tampered with)")
    return header, blobs


def container_kind(data: bytes) -> str | None:
    """The ``kind`` in the header of container bytes (nothing checked), or None if there is none."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        return None
    (n,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    try:
        header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header.get("kind") if isinstance(header, dict) else None


def write_container(path: str | Path, header: dict[str, Any], blobs: dict[str, bytes], *, private: bool) -> Path:
    """:func:`pack_container` to ``path``, atomically; mode 0600 if ``private``."""
    from veil.files import atomic_writer

    with atomic_writer(path, mode=0o600 if private else 0o644) as f:
        f.write(pack_container(header, blobs))
    return Path(path)


def read_file(path: str | Path) -> bytes:
    """A file's bytes, or an HEError naming it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise HEError(f"{path}: no such file") from None
    except OSError as e:
        raise HEError(f"{path}: cannot read ({e.strerror})") from None


def read_container(path: str | Path, kind: str | tuple[str, ...]) -> tuple[dict[str, Any], dict[str, bytes]]:
    return unpack_container(read_file(path), kind, str(path))


# ---- keys -----------------------------------------------------------------------------------------
@dataclass
class Keys:
    """SEAL objects for one side: the client holds ``secret``; the server's has ``secret=None``."""

    params: HEParams
    context: Any
    key_id: str
    public: Any
    relin: Any
    galois: Any | None
    galois_steps: tuple[int, ...]
    secret: Any | None = None

    @property
    def is_private(self) -> bool:
        return self.secret is not None


def galois_element(step: int, n: int) -> int:
    """SEAL's Galois element of a rotation by ``step`` slots (left for positive steps) at ring dimension
    ``n``: ``3^step mod 2n``, negative steps taken modulo the ``n / 2`` slots."""
    return pow(3, step % (n // 2), 2 * n)


def keygen(params: HEParams, galois_steps: list[int] | tuple[int, ...] = ()) -> Keys:
    """Fresh keys (SEAL draws them from the OS's randomness); Galois keys for ``galois_steps`` only."""
    import tenseal.sealapi as seal

    ctx = seal_context(params)
    gen = seal.KeyGenerator(ctx)
    public = seal.PublicKey()
    gen.create_public_key(public)
    relin = seal.RelinKeys()
    gen.create_relin_keys(relin)
    steps = tuple(sorted({int(s) for s in galois_steps}))
    galois = None
    if steps:
        bad = [s for s in steps if not 0 < abs(s) < params.slots]
        if bad:
            raise HEError(f"rotation steps must lie in 1..{params.slots - 1} (or negative), got {bad}")
        galois = seal.GaloisKeys()
        gen.create_galois_keys([galois_element(s, params.poly_modulus_degree) for s in steps], galois)
    key_id = hashlib.sha256(to_bytes(public)).hexdigest()[:32]
    return Keys(params, ctx, key_id, public, relin, galois, steps, secret=gen.secret_key())


def _header(keys: Keys, kind: str) -> dict[str, Any]:
    return {"kind": kind, "params": keys.params.as_dict(), "key_id": keys.key_id,
            "galois_steps": list(keys.galois_steps)}


def server_key_bytes(keys: Keys) -> bytes:
    """The server key file's bytes (public, relinearisation and Galois keys; never the secret key):
    what the client gives the server, as a file or over the network."""
    blobs = {"public": to_bytes(keys.public), "relin": to_bytes(keys.relin)}
    if keys.galois is not None:
        blobs["galois"] = to_bytes(keys.galois)
    return pack_container(_header(keys, "server-key"), blobs)


def save_keys(keys: Keys, client_path: str | Path, server_path: str | Path) -> tuple[Path, Path]:
    """The client key file (secret key; mode 0600) and the server key file (no secret)."""
    from veil.files import write_atomic

    if not keys.is_private:
        raise HEError("these keys have no secret key: only the client that made them can save a key pair")
    write_container(client_path, _header(keys, "client-key"),
                    {"secret": to_bytes(keys.secret), "public": to_bytes(keys.public)}, private=True)
    write_atomic(server_path, server_key_bytes(keys))
    return Path(client_path), Path(server_path)


def load_keys(path: str | Path) -> Keys:
    """A client key file (with the secret key) or a server key file (without)."""
    header, blobs = read_container(path, ("client-key", "server-key"))
    return _keys(header, blobs, str(path))


def load_server_keys(source: str | Path | bytes, where: str | None = None) -> Keys:
    """The server's side: a server key file (or its bytes, received from a client). A client key file
    is refused: it holds the secret key, which must never reach the server."""
    if isinstance(source, bytes):
        data, where = source, where or "server keys"
    else:
        data, where = read_file(source), where or str(source)
    header, blobs = unpack_container(data, ("server-key", "client-key"), where)
    if header["kind"] != "server-key" or "secret" in blobs:
        raise HEError(f"{where}: a client key file, which holds the secret key: the server refuses it (give the "
                      "server the server key file; the client key file never leaves the client)")
    return _keys(header, blobs, where)


def _keys(header: dict[str, Any], blobs: dict[str, bytes], where: str) -> Keys:
    import tenseal.sealapi as seal

    params = HEParams.from_dict(header.get("params", {}))
    ctx = seal_context(params)
    if "public" not in blobs:
        raise HEError(f"{where}: no public key")
    public = from_bytes(seal.PublicKey, ctx, blobs["public"], f"{where}: public key")
    if hashlib.sha256(blobs["public"]).hexdigest()[:32] != header.get("key_id"):
        raise HEError(f"{where}: the public key does not match the key id (tampered with)")
    try:
        steps = tuple(int(s) for s in header.get("galois_steps", []))
    except (TypeError, ValueError):
        raise HEError(f"{where}: damaged header (galois_steps)") from None
    if header["kind"] == "client-key":
        secret = from_bytes(seal.SecretKey, ctx, blobs["secret"], f"{where}: secret key")
        return Keys(params, ctx, header["key_id"], public, None, None, steps, secret=secret)
    if "relin" not in blobs:
        raise HEError(f"{where}: no relinearisation key")
    relin = from_bytes(seal.RelinKeys, ctx, blobs["relin"], f"{where}: relinearisation key")
    galois = from_bytes(seal.GaloisKeys, ctx, blobs["galois"], f"{where}: Galois keys") if "galois" in blobs else None
    if bool(steps) != (galois is not None):
        raise HEError(f"{where}: the header's rotation steps and the Galois keys disagree (tampered with)")
    return Keys(params, ctx, header["key_id"], public, relin, galois, steps)
