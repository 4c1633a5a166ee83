import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the test helpers beside this file

from models import REAL_MODELS  # noqa: E402


def _real_model(name: str, make_target: str = "models") -> Path:
    path = REAL_MODELS[name].path
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make {make_target}`")
    return path


# The fixtures that hand a test a real model: such a test must be marked `model`
# (`make test-fast` deselects those and runs without models/).
REAL_MODEL_FIXTURES = ("smollm2_path", "gemma3_path", "qwen_path")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _real_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _real_model("gemma3", "models-all")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return _real_model("qwen2.5", "models-all")


def pytest_collection_modifyitems(config, items):
    """A test that uses a real model must be marked `model`. Long runs (`slow`:
    fuzzing with 10,000+ inputs, load tests) run only when asked for (`pytest -m
    slow`, `make test-slow`); otherwise they are deselected, not skipped."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("model") is None
                and set(REAL_MODEL_FIXTURES) & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("these tests use a real model and need `@pytest.mark.model` "
                                "(or `pytestmark = pytest.mark.model`):\n  " + "\n  ".join(unmarked))
    expression = config.getoption("markexpr") or ""
    if "slow" in expression and "not slow" not in expression:
        return
    long_runs = [item for item in items if "slow" in item.keywords]
    if long_runs:
        config.hook.pytest_deselected(items=long_runs)
        items[:] = [item for item in items if "slow" not in item.keywords]
