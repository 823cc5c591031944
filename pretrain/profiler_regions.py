"""Profiler region names: marked with torch.profiler.record_function by the training loop,
the memory layer and the value-table communication; read by pretrain/profiling.py (and so
tools/profile.py) to attribute step time. Marking and reading code import them from here.
"""

from __future__ import annotations

FORWARD = "train/forward"
BACKWARD = "train/backward"
STEP = "train/step"  # the optimizer step: once per step, so profiling counts steps by it
MICRO_STEP = "train/micro_step"  # DeepSpeed's step() after a micro-batch before the accumulation boundary
EVAL = "eval"  # evaluation: left out of the step-time shares
STEP_REGIONS = (FORWARD, BACKWARD, STEP, MICRO_STEP)

SCORING = "memory/scoring"  # MemoryPlus.search: query projection, product-key top-k, softmax
BAG_FORWARD = "memory/bag_forward"  # the value-table read (for P > 1 it contains the communication)
COMMUNICATION = "memory/communication"  # the forward collectives of a partitioned table (P > 1)
MEMORY_REGIONS = {"scoring": SCORING, "bag_forward": BAG_FORWARD, "communication": COMMUNICATION}
