"""A stand-in for `python -m pretrain.train` in the cluster protocol test: what the real
trainer does with pretrain.slurm, without a model. Each step sleeps briefly; on a stop
signal rank 0 saves the step to <run_dir>/fake_state.json, then requeues the job; a
requeued job resumes from that step. Invoked as: fake_trainer.py -m pretrain.train --config X.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.files import atomic_write
from pretrain.slurm import StopSignal, distributed_env_from_slurm, requeue_job

MAX_STEPS = 60


def main():
    config = Path(sys.argv[sys.argv.index("--config") + 1])
    state_file = config.parent / "fake_state.json"
    for key, value in distributed_env_from_slurm().items():
        os.environ.setdefault(key, value)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)
    print(
        f"rank {rank}/{world} local {os.environ['LOCAL_RANK']} master {os.environ['MASTER_ADDR']}:"
        f"{os.environ['MASTER_PORT']} restart {os.environ.get('SLURM_RESTART_COUNT', '0')} "
        f"allreduce {int(total)}",
        flush=True,
    )
    step = json.loads(state_file.read_text())["step"] if state_file.exists() else 0
    if step:
        print(f"rank {rank} resumed at step {step}", flush=True)
    stop = StopSignal()
    while step < MAX_STEPS:
        time.sleep(0.05)
        step += 1
        print(f"rank {rank} step {step}", flush=True)
        if stop.should_stop():
            if rank == 0:
                atomic_write(state_file, json.dumps({"step": step}))
            dist.barrier()
            print(f"rank {rank} stopping at step {step} on signal {stop.received}", flush=True)
            if rank == 0:
                requeue_job(stop=stop)
            stop.close()
            dist.destroy_process_group()
            return
    stop.close()
    print(f"rank {rank} finished at step {step}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
