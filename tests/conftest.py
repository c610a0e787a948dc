"""Shared test helpers live in tests/mpc/mpc_testing.py; make them importable from every test folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "mpc"))
