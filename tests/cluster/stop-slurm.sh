#!/usr/bin/env bash
# Stops what tests/cluster/start-slurm.sh started: slurmd, slurmctld and munged, by their pid
# files (jobs still running are cancelled first). The configuration and the state directory stay
# (MERGEFLOW_SLURM_STATE, default /var/tmp/mergeflow-slurm: its log/ holds the daemons' logs and
# the job completion log); start-slurm.sh starts the same cluster again.
set -uo pipefail

STATE=${MERGEFLOW_SLURM_STATE:-/var/tmp/mergeflow-slurm}

stop() {  # stop <pid file> <name>: TERM, wait up to 10 s, then KILL
    local pidfile=$1 name=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop-slurm.sh: $name ($pid) did not stop; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$pidfile"
}

if command -v scancel >/dev/null && scontrol ping >/dev/null 2>&1; then
    squeue -h -o %i | xargs -r scancel --quiet
fi
stop "$STATE/slurmd.pid" slurmd
stop "$STATE/slurmctld.pid" slurmctld
stop /run/munge/munged.pid munged
echo "stop-slurm.sh: stopped (logs in $STATE/log/)"
