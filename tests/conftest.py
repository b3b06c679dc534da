import os
import pathlib

import pytest

import metabatch as mb

OMNIGLOT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
OMNIGLOT = pathlib.Path(os.environ.get("METABATCH_OMNIGLOT", OMNIGLOT))


@pytest.fixture
def key():
    return mb.random.key(0)


@pytest.fixture
def omniglot_dir():
    if not (OMNIGLOT / "images_background_small1.zip").exists():
        pytest.skip(f"Omniglot subsets not found in {OMNIGLOT} (set METABATCH_OMNIGLOT to the folder "
                    f"holding images_background_small1.zip / images_background_small2.zip)")
    return OMNIGLOT
