#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for checking `srun`/`sbatch` runs of asrbench (docs/slurm.md).
# Debian's slurm-wlm (22.05 on bookworm) and munge, one node `localhost` whose CPUs are oversubscribed
# (a 2-core machine takes nodes=4), no cgroups (it runs in containers): proctrack/linuxproc, task/none.
# Every step is idempotent: packages already installed, a config already written, daemons already up
# are left as they are, so running it twice is safe. KillWait=30 (SLURM's default): on a plain scancel or a
# preemption a job's tasks get SIGTERM and 30 s to save a checkpoint and exit before SIGKILL. Needs root
# (apt-get, daemons). Usage:
#   recipes/slurm/setup_local.sh          install, configure, start; wait until `sinfo` shows the node idle
#   recipes/slurm/setup_local.sh stop     stop slurmd, slurmctld and munged (packages and config stay)
#   CPUS=8 recipes/slurm/setup_local.sh   a node of 8 CPUs (default 4)
set -euo pipefail

CONF=/etc/slurm/slurm.conf
CPUS=${CPUS:-4}
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm

stop() {  # each daemon by the pid it wrote, never by name
  local pidfile pid
  for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
    fi
    rm -f "$pidfile"
  done
}

running() {  # running PIDFILE: the daemon that wrote it is alive
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "error: $0 needs root (apt-get and the SLURM daemons)" >&2; exit 2; }

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v srun >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge
fi

# 2. munge: a key (the package usually writes one) and the daemon
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! running /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n </dev/null | unmunge >/dev/null || { echo "error: munged does not answer (see /var/log/munge/munged.log)" >&2; exit 1; }

# 3. slurm.conf: written when missing or when it is not ours (a real cluster's config is never replaced)
if [ -f "$CONF" ] && ! grep -q '^# asrbench recipes/slurm/setup_local.sh' "$CONF"; then
  echo "error: $CONF exists and was not written by this script; this machine has its own SLURM, use it" >&2
  exit 2
fi
mkdir -p "$STATE" "$SPOOL" "$LOGS"
cat > "$CONF.new" <<EOF
# asrbench recipes/slurm/setup_local.sh: one node on localhost, CPUs oversubscribed, no cgroups
ClusterName=asrbench-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerType=sched/backfill
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
EOF
if cmp -s "$CONF.new" "$CONF"; then
  rm "$CONF.new"
else
  mv "$CONF.new" "$CONF"
  if running /run/slurmctld.pid; then scontrol reconfigure; fi
fi

# 4. daemons
running /run/slurmctld.pid || slurmctld
running /run/slurmd.pid || slurmd -N localhost

# 5. wait for the node
for _ in $(seq 60); do
  state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
  case "$state" in
    idle|mix|alloc) break;;
    down*|drain*) scontrol update nodename=localhost state=resume 2>/dev/null || true;;
  esac
  sleep 1
done
state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
case "$state" in
  idle|mix|alloc) sinfo; echo "SLURM ready: node localhost $state, $CPUS CPUs (stop it with $0 stop)";;
  *) echo "error: node localhost is '${state:-unknown}', not idle (see $LOGS/slurmctld.log, $LOGS/slurmd.log)" >&2
     exit 1;;
esac
