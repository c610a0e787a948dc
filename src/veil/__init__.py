"""Veil: machine learning on data that nobody may see.

    import veil
    def main(session):
        x = session.share(images if session.party == "alice" else None, owner="alice")
        ...
    veil.launch(main)

    secure = veil.nn.from_torch(torch_module)        # PyTorch model in, secure model out
"""

from veil import data, nn
from veil.mpc import SecretTensor, Session, SessionOptions, cat, launch, launch_script, run_party, stack
from veil.net.transport import PartyError
from veil.ring import EncodingError, FixedPoint

__version__ = "0.1.0"
__all__ = ["EncodingError", "FixedPoint", "PartyError", "SecretTensor", "Session", "SessionOptions", "cat", "data",
           "launch", "launch_script", "nn", "run_party", "stack"]
