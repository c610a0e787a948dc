"""The CKKS operations of encrypted inference, timed in SEAL (TenSEAL) and in OpenFHE: how veil.he chose.

Parameters: the depth of the MNIST model (5 levels), 28-bit scale, 38-bit outer primes, 128-bit
security by each library's own check; one thread. One JSON line per library and setting:
``ct_pt_ms`` (ciphertext times plaintext), ``ct_pt_add_ms`` (with the addition into a sum),
``square_ms`` (square, relinearise, rescale), ``rotate_ms``, ``ciphertext_bytes``,
``relin_key_bytes``, ``galois_key_bytes`` (one rotation step), ``square_max_error`` (4,096 values in
[0, 1]).

    python benchmarks/he_libraries.py --library seal       # Veil's environment
    # OpenFHE has no wheel for Python 3.11; in a Python 3.10 environment:
    #   python3.10 -m venv /tmp/ofhe && /tmp/ofhe/bin/pip install openfhe numpy
    OMP_NUM_THREADS=1 /tmp/ofhe/bin/python benchmarks/he_libraries.py --library openfhe
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

SLOTS, DEPTH, SCALE_BITS, OUTER_BITS = 4096, 5, 28, 38


def _ms(f: Callable[[], object], k: int = 20) -> float:
    f()
    times = []
    for _ in range(k):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


def seal() -> dict:
    import tenseal.sealapi as s

    n = 8192
    p = s.EncryptionParameters(s.SCHEME_TYPE.CKKS)
    p.set_poly_modulus_degree(n)
    p.set_coeff_modulus(s.CoeffModulus.Create(n, [OUTER_BITS] + [SCALE_BITS] * DEPTH + [OUTER_BITS]))
    ctx = s.SEALContext(p, True, s.SEC_LEVEL_TYPE.TC128)
    gen = s.KeyGenerator(ctx)
    pk, rk, gk = s.PublicKey(), s.RelinKeys(), s.GaloisKeys()
    gen.create_public_key(pk)
    gen.create_relin_keys(rk)
    gen.create_galois_keys([pow(3, 1, 2 * n)], gk)
    enc, ev, ec = s.Encryptor(ctx, pk), s.Evaluator(ctx), s.CKKSEncoder(ctx)
    x = np.random.rand(SLOTS)
    pt = s.Plaintext()
    ec.encode(x.tolist(), 2.0 ** SCALE_BITS, pt)
    ct = s.Ciphertext()
    enc.encrypt(pt, ct)
    w = s.Plaintext()
    ec.encode(np.random.rand(SLOTS).tolist(), ct.parms_id(), 2.0 ** SCALE_BITS, w)
    acc = s.Ciphertext()
    ev.multiply_plain(ct, w, acc)

    def mul() -> object:
        out = s.Ciphertext()
        ev.multiply_plain(ct, w, out)
        return out

    def square() -> object:
        out = s.Ciphertext()
        ev.square(ct, out)
        ev.relinearize_inplace(out, rk)
        ev.rescale_to_next_inplace(out)
        return out

    def rotate() -> object:
        out = s.Ciphertext()
        ev.rotate_vector(ct, 1, gk, out)
        return out

    dec = s.Plaintext()
    s.Decryptor(ctx, gen.secret_key()).decrypt(square(), dec)
    err = float(np.abs(np.array(ec.decode_double(dec)[:SLOTS]) - x * x).max())
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        for name, obj in (("ciphertext_bytes", ct), ("relin_key_bytes", rk), ("galois_key_bytes", gk)):
            obj.save(f"{d}/{name}")
            sizes[name] = os.path.getsize(f"{d}/{name}")
    return {"library": "seal (tenseal 0.3.18)", "ring_dim": n, "key_switching": "special prime",
            "ct_pt_ms": _ms(mul), "ct_pt_add_ms": _ms(lambda: ev.add_inplace(acc, mul())), "square_ms": _ms(square),
            "rotate_ms": _ms(rotate), **sizes, "square_max_error": err}


def openfhe(ring_dim: int, technique: str) -> dict:
    import openfhe as o

    p = o.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(DEPTH)
    p.SetScalingModSize(SCALE_BITS)
    p.SetFirstModSize(OUTER_BITS)
    p.SetRingDim(ring_dim)
    p.SetBatchSize(SLOTS)
    p.SetSecurityLevel(o.SecurityLevel.HEStd_128_classic)
    p.SetScalingTechnique(o.ScalingTechnique.FIXEDMANUAL)
    if technique == "bv":
        p.SetKeySwitchTechnique(o.KeySwitchTechnique.BV)
    cc = o.GenCryptoContext(p)
    for feature in (o.PKESchemeFeature.PKE, o.PKESchemeFeature.KEYSWITCH, o.PKESchemeFeature.LEVELEDSHE):
        cc.Enable(feature)
    keys = cc.KeyGen()
    cc.EvalMultKeyGen(keys.secretKey)
    cc.EvalRotateKeyGen(keys.secretKey, [1])
    x = np.random.rand(SLOTS)
    ct = cc.Encrypt(keys.publicKey, cc.MakeCKKSPackedPlaintext(x.tolist()))
    w = cc.MakeCKKSPackedPlaintext(np.random.rand(SLOTS).tolist())
    acc = cc.EvalMult(ct, w)
    dec = cc.Decrypt(cc.Rescale(cc.EvalSquare(ct)), keys.secretKey)
    dec.SetLength(SLOTS)
    err = float(np.abs(np.array(dec.GetRealPackedValue()) - x * x).max())
    sizes = {}
    with tempfile.TemporaryDirectory() as d:
        o.SerializeToFile(f"{d}/ct", ct, o.BINARY)
        cc.SerializeEvalMultKey(f"{d}/mk", o.BINARY)
        cc.SerializeEvalAutomorphismKey(f"{d}/rk", o.BINARY)
        sizes = {"ciphertext_bytes": os.path.getsize(f"{d}/ct"), "relin_key_bytes": os.path.getsize(f"{d}/mk"),
                 "galois_key_bytes": os.path.getsize(f"{d}/rk")}
    return {"library": "openfhe", "ring_dim": ring_dim, "key_switching": technique,
            "ct_pt_ms": _ms(lambda: cc.EvalMult(ct, w)),
            "ct_pt_add_ms": _ms(lambda: cc.EvalAdd(acc, cc.EvalMult(ct, w))),
            "square_ms": _ms(lambda: cc.Rescale(cc.EvalSquare(ct))), "rotate_ms": _ms(lambda: cc.EvalRotate(ct, 1)),
            **sizes, "square_max_error": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", choices=["seal", "openfhe"], default="seal")
    args = ap.parse_args()
    if args.library == "seal":
        print(json.dumps(seal()), flush=True)
        return
    for ring_dim, technique in ((8192, "hybrid"), (8192, "bv"), (16384, "hybrid")):
        try:
            print(json.dumps(openfhe(ring_dim, technique)), flush=True)
        except RuntimeError as e:  # OpenFHE refuses parameters below its security table
            print(json.dumps({"library": "openfhe", "ring_dim": ring_dim, "key_switching": technique,
                              "refused": str(e).split(":")[-1].strip()}), flush=True)


if __name__ == "__main__":
    main()
