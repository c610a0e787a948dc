"""The secure-computation engine: secret-shared tensors, protocols, the dealer, sessions."""

from veil.mpc import material as _material  # noqa: F401 - registers the dealer's recipes
from veil.mpc.runtime import launch, launch_script, run_party
from veil.mpc.session import Session, SessionOptions
from veil.mpc.tensor import SecretTensor, cat, stack

__all__ = ["SecretTensor", "Session", "SessionOptions", "cat", "launch", "launch_script", "run_party", "stack"]
