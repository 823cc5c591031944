"""One rank of the two-rank StopSignal test. Phase 1: only rank 1 sends itself SIGUSR1 at
step 3. Phase 2: rank 0 gets SIGTERM and rank 1 SIGUSR1 at step 2. Each phase loops calling
should_stop() every step. Prints one JSON line per phase."""

import json
import os
import signal
import sys

import torch.distributed as dist

from pretrain.slurm import StopSignal


def run_phase(rank, signals_at):
    stop = StopSignal()
    stopped_at = None
    for step in range(50):
        for sig in signals_at.get((rank, step), ()):
            os.kill(os.getpid(), sig)
        if stop.should_stop():
            stopped_at = step
            break
    result = {"rank": rank, "stopped_at": stopped_at, "received": stop.received, "requeue": stop.requeue}
    stop.close()
    return result


def main():
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    phases = [
        {(1, 3): [signal.SIGUSR1]},
        {(0, 2): [signal.SIGTERM], (1, 2): [signal.SIGUSR1]},
    ]
    print(json.dumps([run_phase(rank, signals_at) for signals_at in phases]), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
