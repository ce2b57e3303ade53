import sys
from pathlib import Path

# Tests import the zoo as ``tests.models``; make the repo root importable without installing it twice.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
