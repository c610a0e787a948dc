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


# ---- container files ------------------------------------------------------------------------------
def write_container(path: str | Path, header: dict[str, Any], blobs: dict[str, bytes], *, private: bool) -> Path:
    """``MAGIC``, a length-prefixed JSON header (with each blob's size and SHA-256), then the blobs;
    atomically, mode 0600 if ``private``."""
    from veil.files import atomic_writer

    header = {**header, "blobs": {k: {"size": len(v), "sha256": hashlib.sha256(v).hexdigest()}
                                  for k, v in blobs.items()}}
    head = json.dumps(header, sort_keys=True).encode()
    with atomic_writer(path, mode=0o600 if private else 0o644) as f:
        f.write(MAGIC + struct.pack(">I", len(head)) + head)
        for k in sorted(blobs):  # the header lists them sorted (sort_keys)
            f.write(blobs[k])
    return Path(path)


def read_container(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise HEError(f"{path}: no such file") from None
    except OSError as e:
        raise HEError(f"{path}: cannot read ({e.strerror})") from None
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise HEError(f"{path}: not a Veil HE file")
    (n,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HEError(f"{path}: damaged header") from None
    if not isinstance(header, dict) or header.get("kind") != kind:
        got = header.get("kind") if isinstance(header, dict) else None
        raise HEError(f"{path}: a {got or 'unknown'} file, expected a {kind} file")
    blobs, pos = {}, start + n
    for name, meta in sorted(header.get("blobs", {}).items()):
        blob = data[pos:pos + int(meta["size"])]
        pos += int(meta["size"])
        if len(blob) != int(meta["size"]) or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise HEError(f"{path}: {name} does not match its digest (truncated or tampered with)")
        blobs[name] = blob
    if pos != len(data):
        raise HEError(f"{path}: {len(data) - pos} trailing bytes (tampered with)")
    return header, blobs


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


def save_keys(keys: Keys, client_path: str | Path, server_path: str | Path) -> tuple[Path, Path]:
    """The client key file (secret key; mode 0600) and the server key file (no secret)."""
    if not keys.is_private:
        raise HEError("these keys have no secret key: only the client that made them can save a key pair")
    header = {"params": keys.params.as_dict(), "key_id": keys.key_id, "galois_steps": list(keys.galois_steps)}
    public = {"public": to_bytes(keys.public), "relin": to_bytes(keys.relin)}
    if keys.galois is not None:
        public["galois"] = to_bytes(keys.galois)
    write_container(client_path, {**header, "kind": "client-key"},
                    {"secret": to_bytes(keys.secret), "public": public["public"]}, private=True)
    write_container(server_path, {**header, "kind": "server-key"}, public, private=False)
    return Path(client_path), Path(server_path)


def load_keys(path: str | Path) -> Keys:
    """A client key file (with the secret key) or a server key file (without)."""
    import tenseal.sealapi as seal

    try:
        header, blobs = read_container(path, "client-key")
    except HEError as e:
        if "expected a client-key file" not in str(e):
            raise
        header, blobs = read_container(path, "server-key")
    params = HEParams.from_dict(header.get("params", {}))
    ctx = seal_context(params)
    public = from_bytes(seal.PublicKey, ctx, blobs["public"], f"{path}: public key")
    if hashlib.sha256(blobs["public"]).hexdigest()[:32] != header.get("key_id"):
        raise HEError(f"{path}: the public key does not match the key id (tampered with)")
    steps = tuple(int(s) for s in header.get("galois_steps", []))
    if header["kind"] == "client-key":
        secret = from_bytes(seal.SecretKey, ctx, blobs["secret"], f"{path}: secret key")
        return Keys(params, ctx, header["key_id"], public, None, None, steps, secret=secret)
    relin = from_bytes(seal.RelinKeys, ctx, blobs["relin"], f"{path}: relinearisation key")
    galois = from_bytes(seal.GaloisKeys, ctx, blobs["galois"], f"{path}: Galois keys") if "galois" in blobs else None
    return Keys(params, ctx, header["key_id"], public, relin, galois, steps)
