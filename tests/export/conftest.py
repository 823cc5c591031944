import pytest



@pytest.fixture(scope="session")
def export_data_cache(tmp_path_factory):
    """One tiny embedded dataset shared by the export tests."""
    from pretrain.data import prepare_embedded_dataset
    from tests.export.export_helpers import config

    cache = tmp_path_factory.mktemp("export-data")
    cfg = config(cache / "unused", cache)
    prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    return cache


@pytest.fixture(scope="session")
def trained(tmp_path_factory, export_data_cache):
    """Tiny runs at P = 1 for ZeRO stages 0-3, each with the training model's logits on fixed tokens."""
    from tests.export.export_helpers import train_and_record

    root = tmp_path_factory.mktemp("export-runs")
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = root / f"zero{stage}"
        train_and_record(0, str(run_dir), str(export_data_cache), [f"train.zero_stage={stage}"])
        runs[stage] = run_dir
    return runs
