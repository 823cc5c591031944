"""Memory-layer kernels: product-key top-k and the weighted embedding bag.

Knows nothing of training. `backend` picks the implementation: "auto" uses Triton for
CUDA tensors (when Triton is importable) and the PyTorch reference otherwise;
"triton" and "torch" force one. All paths are differentiable. `kernels.ops` wraps both
functions as `torch.library` custom ops (fake + autograd), the form torch.compile keeps whole.

Importing this package loads no torch (it is imported on first use), so that its torch-free modules
(`kernels.devices`: tools/gpu_report.py on the CPU machine) start in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "triton", "torch")
VALUE_GRADS = ("sorted", "atomic", "sparse")  # the bag's value-gradient forms (embedding_bag)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map "auto" to a concrete backend for `tensor`'s device; validate the name."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {BACKENDS} (config key memory.kernel)")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    return backend


def pkm_topk(query, keys1, keys2, k: int, backend: str = "auto"):
    """Top-k product-key search with softmax weights.

    query (T, H, k_dim), keys1/keys2 (H, n_keys, k_dim // 2) -> weights (T, H, k) in the
    query's dtype, indices (T, H, k).
    """
    if _search_backend(query, keys1, keys2, k, backend) == "triton":
        from kernels import pkm_triton

        return pkm_triton.pkm_topk(query, keys1, keys2, k)
    from kernels import reference

    return reference.pkm_topk(query, keys1, keys2, k)


def pkm_topk_fp32(query, keys1, keys2, k: int, backend: str = "auto"):
    """`pkm_topk` with the weights as the softmax computes them, before the cast to the
    query's dtype: at least fp32 (float64 stays). The custom op (kernels.ops) returns and
    saves these: its backward w * (g - sum(g * w)) cancels a gradient common to the k
    slots only for weights that sum to 1, which bf16-rounded weights do not. Not meant
    for autograd (the op registers its own backward)."""
    import torch

    acc = torch.promote_types(query.dtype, torch.float32)
    if _search_backend(query, keys1, keys2, k, backend) == "triton":
        from kernels import pkm_triton

        weights, indices = pkm_triton.pkm_topk_forward(query, keys1, keys2, k)
        return weights.to(acc), indices
    from kernels import reference

    return reference.pkm_topk_fp32(query, keys1, keys2, k)


def _search_backend(query, keys1, keys2, k: int, backend: str) -> str:
    """Check the search's shapes and k; the concrete backend."""
    if query.shape[-1] != 2 * keys1.shape[-1] or keys1.shape != keys2.shape:
        raise ValueError(
            f"query dim {query.shape[-1]} must equal twice the half-key dim; keys1 {tuple(keys1.shape)}, "
            f"keys2 {tuple(keys2.shape)}"
        )
    if k > keys1.shape[1]:
        raise ValueError(f"k={k} exceeds n_keys={keys1.shape[1]} (config key memory.k)")
    return resolve_backend(backend, query)


def embedding_bag(
    values, indices, weights, backend: str = "auto", value_grad: str = "sorted", check_indices: bool = True
):
    """Weighted bag over value rows: values (N, d), indices/weights (T, H, k) -> (T, d).

    value_grad: "sorted" (deterministic, default), "atomic" (fp32 atomics; Triton only)
    or "sparse" (a coalesced sparse COO gradient of the touched rows, on either backend;
    the torch backend's dense gradient ignores sorted/atomic).
    check_indices (Triton backend): refuse indices outside [0, N) with a ValueError before a
    kernel reads out of bounds; a host read, which on a GPU waits for the queued work. The memory
    layers pass False: their top-k indices are in range by construction. (The torch backend's
    `F.embedding_bag` checks its indices itself.)
    """
    if indices.shape != weights.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must match")
    if value_grad not in VALUE_GRADS:
        raise ValueError(f"value_grad={value_grad!r} must be one of {', '.join(VALUE_GRADS)}")
    if resolve_backend(backend, values) == "triton":
        from kernels import bag_triton

        return bag_triton.embedding_bag(values, indices, weights, value_grad=value_grad, check_indices=check_indices)
    from kernels import reference

    if value_grad == "sparse":
        return reference.embedding_bag_sparse(values, indices, weights)
    return reference.embedding_bag(values, indices, weights)
