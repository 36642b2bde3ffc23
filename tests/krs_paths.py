"""Paths shared by the Python tests (importable as `krs_paths` from any test module; a module
named `conftest` would be shadowed by the nested conftest.py files)."""
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = pathlib.Path(os.environ.get("KRS_BUILD_DIR", ROOT / "build"))
DEFAULT_MODEL = ROOT / "models" / "default.gguf"
CACHE = ROOT / "tests" / ".cache"  # git-ignored: generated tiny models and oracle outputs
