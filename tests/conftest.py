"""Shared pytest setup: offline Hub, quiet progress bars, and the optional real-data folder."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (as in CI), or wherever QDISTILL_SHARED_DATA points.
SHARED_DATA = Path(os.environ.get("QDISTILL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """The real-data folder; tests that need it skip cleanly when it is absent."""
    if not (SHARED_DATA / "cxr-paired" / "metadata.csv").is_file():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (set QDISTILL_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads cost 10-100x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
