import pytest

from tests.rag.shared import embedder


@pytest.fixture(scope="session")
def minilm():
    return embedder()
