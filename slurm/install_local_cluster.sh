#!/usr/bin/env bash
# Install Debian's Slurm + munge packages (a one-node test cluster is started by the tests).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
