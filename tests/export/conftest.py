import pytest


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_cache):
    """Tiny runs at P = 1 for ZeRO stages 0-3, each with the training model's logits on fixed tokens."""
    from tests.export.export_helpers import train_and_record

    root = tmp_path_factory.mktemp("export-runs")
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = root / f"zero{stage}"
        train_and_record(0, str(run_dir), str(data_cache), [f"train.zero_stage={stage}"])
        runs[stage] = run_dir
    return runs
