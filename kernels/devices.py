"""Peak memory bandwidth of the GPU SKUs the benchmarks report against."""

from __future__ import annotations

PEAK_BANDWIDTH_TBS = {
    "H100 SXM": 3.35,
    "H100 PCIe": 2.0,
    "H100 NVL": 3.9,
    "H200": 4.8,
    "H200 NVL": 4.8,  # the PCIe card: H200's memory at lower clocks, so its own pinned launch configs
    "A100 80GB": 2.0,
}


def sku_for(device_name: str) -> str | None:
    """Map a CUDA device name (torch.cuda.get_device_name) to a key of PEAK_BANDWIDTH_TBS, None
    where the name does not settle it: a GH200 comes with HBM3 (4.0 TB/s) or HBM3e (4.9 TB/s)."""
    name = device_name.upper()
    if "GH200" in name:
        return None
    if "H200" in name:
        return "H200 NVL" if "NVL" in name else "H200"
    if "H100" in name:
        if "NVL" in name:
            return "H100 NVL"
        return "H100 PCIe" if "PCIE" in name else "H100 SXM"
    if "A100" in name and "80G" in name:
        return "A100 80GB"
    return None
