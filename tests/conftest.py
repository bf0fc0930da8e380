import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the session: the built-in corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3 API on 127.0.0.1 (moto's server mode, a real HTTP server, not a mock of the client), with its
    endpoint and credentials in this process's environment (pyarrow, and so Ray's storage, read them)."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    yield env
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray instance shared by every integration test (start-up costs tens of seconds); its processes
    (Train controllers and workers too) know the test's S3 endpoint."""
    import ray
    # The dashboard serves the State API that Ray Train's PlacementGroupCleaner polls: without it the
    # placement groups of trials ASHA stops leak and the next trial waits forever.
    ray.init(num_cpus=2, log_to_driver=True,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", **s3_endpoint}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    from raytrain.tokenizer import byte_tokenizer
    return byte_tokenizer()


def pytest_collection_modifyitems(items):
    """Tests that start and stop a Ray of their own (``own_ray``) run before any test starts the shared one."""
    items.sort(key=lambda item: item.get_closest_marker("own_ray") is None)
