import pytest



@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One embedded dataset (tiny) shared by the trainer tests."""
    from tests.train.helpers import tiny_config

    from pretrain.data import prepare_embedded_dataset

    cache = tmp_path_factory.mktemp("data-cache")
    cfg = tiny_config(cache / "unused", cache)
    prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    return cache
