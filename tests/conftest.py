import os
import sys
from pathlib import Path

import pytest

# Tests import the zoo as ``tests.models``; make the repo root importable without installing it twice.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def _private_rematc_cache(tmp_path_factory):
    """The schedule and profile caches are on by default: keep the suite out of ~/.cache/rematc."""
    previous = os.environ.get("REMATC_CACHE_DIR")
    os.environ["REMATC_CACHE_DIR"] = str(tmp_path_factory.mktemp("rematc-cache"))
    yield
    if previous is None:
        os.environ.pop("REMATC_CACHE_DIR", None)
    else:
        os.environ["REMATC_CACHE_DIR"] = previous
