"""Shared test set-up: a build cache per test session unless GPT2GEN_CACHE is set, and quiet threads."""
import os
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("OMP_NUM_THREADS", "2")
if "GPT2GEN_CACHE" not in os.environ:
    os.environ["GPT2GEN_CACHE"] = str(ROOT / ".pytest_cache" / "gpt2gen")


@pytest.fixture(autouse=True)
def _seed_torch(request):
    """Each test draws the same random numbers however the suite is selected or ordered (-k, -x, one file)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
