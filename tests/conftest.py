import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the session: the built-in corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every integration test (start-up costs tens of seconds)."""
    import ray
    # The dashboard serves the State API that Ray Train's PlacementGroupCleaner polls: without it the
    # placement groups of trials ASHA stops leak and the next trial waits forever.
    ray.init(num_cpus=2, log_to_driver=True,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    from raytrain.tokenizer import byte_tokenizer
    return byte_tokenizer()


def pytest_collection_modifyitems(items):
    """Tests that start and stop a Ray of their own (``own_ray``) run before any test starts the shared one."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is None)
