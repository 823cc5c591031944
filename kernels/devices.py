"""Peak memory bandwidth of the GPU SKUs the benchmarks report against."""

from __future__ import annotations

PEAK_BANDWIDTH_TBS = {"H100 SXM": 3.35, "H100 PCIe": 2.0, "H200": 4.8, "A100 80GB": 2.0}


def sku_for(device_name: str) -> str | None:
    """Map a CUDA device name (torch.cuda.get_device_name) to a key of PEAK_BANDWIDTH_TBS."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIE" in name else "H100 SXM"
    if "A100" in name and "80G" in name:
        return "A100 80GB"
    return None
