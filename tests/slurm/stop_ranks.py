"""One rank of the two-rank StopSignal test: a loop that calls should_stop() every step;
rank `signal_rank` sends SIGUSR1 to itself at step `signal_step`. Prints a JSON line."""
import json
import os
import signal
import sys

import torch.distributed as dist

from pretrain.slurm import StopSignal


def main():
    rank, world, signal_rank, signal_step = (int(x) for x in sys.argv[1:5])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stop = StopSignal()
    stopped_at = None
    for step in range(50):
        if rank == signal_rank and step == signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        if stop.should_stop():
            stopped_at = step
            break
    print(json.dumps({"rank": rank, "stopped_at": stopped_at, "local_flag": stop.local_flag}), flush=True)
    stop.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
