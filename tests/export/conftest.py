import pytest
import torch


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


@pytest.fixture(scope="session")
def inference_export(trained, tmp_path_factory):
    """An fp32 export of the ZeRO-1 run, for the inference and evaluation tests, with its query and
    key projections scaled up: after 2 training steps attention is nearly uniform, so positions and
    masks would barely move the logits and a wrong position id or mask could pass unnoticed."""
    from safetensors.torch import load_file, save_file

    from pretrain.export import export_checkpoint

    out = export_checkpoint(trained[1], tmp_path_factory.mktemp("inference") / "export", show_progress=False)
    weights = load_file(str(out / "model.safetensors"))
    for name in weights:
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            weights[name] = weights[name] * 6.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def hf_model(inference_export):
    """The export through transformers' AutoModelForCausalLM (its standalone modeling code), fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(inference_export, trust_remote_code=True, dtype=torch.float32).eval()
