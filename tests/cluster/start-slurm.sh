#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the cluster test (tests/test_cluster.py) and for
# trying profiles/slurm by hand: installs Debian's slurm-wlm and munge if missing, writes a
# minimal slurm.conf (one node, one partition `cpu`, every address loopback), starts munged,
# slurmctld and slurmd directly (no systemd) and waits until `sinfo` shows the node idle.
#
#   sudo tests/cluster/start-slurm.sh        # as root; tests/cluster/stop-slurm.sh stops it
#
# No accounting database: the executor plugin (snakemake-executor-plugin-slurm 2.x) asks for job
# states with `squeue` when it is told to (`slurm-status-command: squeue`, profiles/slurm) and
# MinJobAge keeps finished jobs in slurmctld's memory long enough for that; jobs that ended are
# also written one line each to the job completion log (JobCompType=jobcomp/filetxt).
#
# Environment: MERGEFLOW_SLURM_STATE (default /var/tmp/mergeflow-slurm) holds the daemons' state,
# logs and pids; MERGEFLOW_SLURM_CPUS (default: this machine's CPUs) and MERGEFLOW_SLURM_MEM_MB
# (default: 90% of its memory) size the node.
set -euo pipefail

STATE=${MERGEFLOW_SLURM_STATE:-/var/tmp/mergeflow-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by mergeflow tests/cluster/start-slurm.sh"

if [ "$(id -u)" -ne 0 ]; then
    echo "start-slurm.sh: needs root (it installs packages and runs the Slurm daemons)" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    echo "start-slurm.sh: installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    echo "start-slurm.sh: $CONF exists and was not written by this script; leaving it alone" >&2
    exit 2
fi

HOST=$(hostname -s)
CPUS=${MERGEFLOW_SLURM_CPUS:-$(getconf _NPROCESSORS_ONLN)}  # not nproc: it obeys OMP_NUM_THREADS
MEM_MB=${MERGEFLOW_SLURM_MEM_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
mkdir -p "$STATE"/{ctld,slurmd,log} /etc/slurm
chmod 755 "$STATE"

# Loopback only: the controller and the node are this host at 127.0.0.1.
NEW_CONF=$(mktemp)
cat > "$NEW_CONF" <<EOF
$MARKER
# One node ($HOST at 127.0.0.1), one partition (cpu); state under $STATE.
ClusterName=mergeflow
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container: track processes through /proc, bind no tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# no slurmdbd: sacct has nothing to read; jobs are queried with squeue (finished ones are kept
# MinJobAge seconds) and every ended job is one line of the job completion log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
MinJobAge=3600
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
# the node is what this script declares, whatever slurmd measures
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# A cluster started with another configuration (another node size) is restarted with this one.
if ! cmp -s "$NEW_CONF" "$CONF" && { running "$STATE/slurmctld.pid" || running "$STATE/slurmd.pid"; }; then
    echo "start-slurm.sh: the configuration changed; restarting the daemons"
    MERGEFLOW_SLURM_STATE=$STATE "$(dirname "$0")/stop-slurm.sh"
fi
mv "$NEW_CONF" "$CONF"
chmod 644 "$CONF"

# munge: the key comes with the package (mungekey writes one if it is missing)
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! running /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
munge -n | unmunge >/dev/null

if ! running "$STATE/slurmctld.pid"; then
    slurmctld -f "$CONF"
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.3; done
if ! running "$STATE/slurmd.pid"; then
    slurmd -f "$CONF" -N "$HOST"
fi

# A node that was down (a stop, a crash) comes back with ReturnToService=2; wait until idle.
for _ in $(seq 120); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    case "$state" in
        idle|mixed|allocated) break ;;
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
case "$state" in
    idle|mixed|allocated) ;;
    *)
        echo "start-slurm.sh: node $HOST is '$state', not idle; see $STATE/log/" >&2
        tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
        exit 1 ;;
esac
sinfo
