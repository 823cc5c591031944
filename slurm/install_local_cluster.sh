#!/usr/bin/env bash
# Install Debian's Slurm + munge packages (Slurm 22.05 on bookworm) for the one-node test
# cluster that tests/slurm/local_cluster.py starts itself (config, state and sockets in a
# temporary folder; nothing under /etc is configured and no service is enabled).
# Idempotent: exits at once when the binaries are present.
set -euo pipefail
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
if have slurmctld && have slurmd && have sbatch && have munged; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_local_cluster.sh: installing slurmctld slurmd slurm-client munge needs root (apt-get)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "install_local_cluster.sh: apt-get not found: install slurmctld, slurmd, slurm-client and munge yourself" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
