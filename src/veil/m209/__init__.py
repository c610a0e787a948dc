"""The M-209 cipher machine: a vectorised keystream generator checked against the ``m209``
package, and key generation following the 1944 technical manual (TM 11-380).

The learning pipeline lives in submodules (they import torch): ``dataset`` (keys, ciphertexts,
packed ``.npy`` splits), ``model`` (PinNet), ``training``, ``evaluate`` (accuracy by key
difficulty, plots) and ``attack`` (key recovery from the network's pin probabilities)."""

from veil.m209.keys import (
    KeyProcedureError,
    check_procedure,
    generate_keys,
    generate_lugs,
    generate_pins,
)
from veil.m209.machine import (
    LUG_PAIRS,
    NUM_BARS,
    NUM_PINS,
    WHEEL_LETTERS,
    WHEEL_SIZES,
    Key,
    array_to_letters,
    decrypt,
    drum_tables,
    drum_tables_from_counts,
    encrypt,
    keystream,
    keystream_from_known_plaintext,
    keystream_from_tables,
    letters_from_positions,
    letters_to_array,
    lug_pair_counts,
    positions_from_letters,
    stack_keys,
)

__all__ = [
    "LUG_PAIRS", "NUM_BARS", "NUM_PINS", "WHEEL_LETTERS", "WHEEL_SIZES", "Key", "KeyProcedureError",
    "array_to_letters", "check_procedure", "decrypt", "drum_tables", "drum_tables_from_counts", "encrypt",
    "generate_keys", "generate_lugs", "generate_pins", "keystream", "keystream_from_known_plaintext",
    "keystream_from_tables", "letters_from_positions", "letters_to_array", "lug_pair_counts",
    "positions_from_letters", "stack_keys",
]
