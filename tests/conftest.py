"""Shared pytest fixtures: where the build, the binary, the default model and scratch live.

C binaries are built by scripts/test.sh (or `make build`) before pytest runs; KRS_BUILD_DIR
overrides the build folder (helpers use their own)."""
import pytest

from krs_paths import BUILD, CACHE, DEFAULT_MODEL, ROOT


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def krserve():
    exe = BUILD / "krserve"
    if not exe.exists():
        pytest.fail(f"{exe} not built; run `make build` first")
    return exe


@pytest.fixture(scope="session")
def default_model():
    if not DEFAULT_MODEL.exists():
        pytest.fail("default model missing; run `make deps`")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def cache_dir():
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE
