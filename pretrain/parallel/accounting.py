"""Traffic of memory parallelism, from shapes: the bytes a rank receives per lookup and per step.

Traffic is counted as the bytes one rank receives from other ranks per optimizer
step (sends are the same amount when the group's token counts are equal):
  per lookup and micro-batch, with T tokens per rank, P ranks per memory group,
  H heads x k slots per token, value width d, output element size e:
    forward:  counts (P-1)*8, indices (P-1)*T*H*k*8, weights (P-1)*T*H*k*e_w,
              outputs (P-1)*T*(d/P)*e
    backward: output grads (P-1)*T*(d/P)*e, weight grads (P-1)*T*H*k*e_w
  per step: the replica all-reduce of the shard gradients (ring: 2*(R-1)/R of the
  shard bytes, R replicas) and the float64 gradient-norm all-reduce (ring, P ranks).
With P = 1 no lookup traffic exists.
"""

from __future__ import annotations


def lookup_bytes(
    tokens: int, heads: int, k: int, v_dim: int, parallel_size: int, weight_bytes: int = 4, out_bytes: int = 4
) -> int:
    """Bytes received per rank for one lookup (forward + backward) of `tokens` tokens."""
    P = parallel_size
    if P == 1:
        return 0
    slots = tokens * heads * k
    forward = (P - 1) * (8 + slots * 8 + slots * weight_bytes + tokens * (v_dim // P) * out_bytes)
    backward = (P - 1) * (tokens * (v_dim // P) * out_bytes + slots * weight_bytes)
    return forward + backward


def replica_reduction_bytes(shard_bytes: int, num_replicas: int) -> int:
    """Bytes received per rank by the all-reduce of the shard gradients over the replicas (ring)."""
    R = num_replicas
    return 2 * (R - 1) * shard_bytes // R if R > 1 else 0


def norm_reduction_bytes(parallel_size: int, element_size: int = 8) -> int:
    """Bytes received per rank by the all-reduce of the squared gradient norm (one float64,
    pretrain.dense_optimizer.squared_norm) over a memory group (ring)."""
    P = parallel_size
    return 2 * (P - 1) * element_size // P if P > 1 else 0
