import pytest


@pytest.fixture(scope="session")
def smf_export(tmp_path_factory, data_cache):
    """A tiny pretrained export (model, tokenizer, probes, slot table) and its dataset folder."""
    from pretrain.data import prepare_embedded_dataset
    from pretrain.export import export_checkpoint
    from pretrain.train import train
    from tests.train.helpers import tiny_config

    root = tmp_path_factory.mktemp("smf")
    cfg = tiny_config(root / "run", data_cache, "train.max_steps=6", "data.vocab_size=384", "model.vocab_size=384")
    train(cfg)
    export = export_checkpoint(root / "run", root / "export", show_progress=False)
    return export, prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
