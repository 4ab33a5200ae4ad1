#!/usr/bin/env bash
# Stop the cluster started by start_cluster.sh DIR, by the PIDs it wrote (munged only if
# start_cluster.sh started it).
set -uo pipefail
for name in slurmd slurmctld munged; do
	pid_file="$1/$name.pid"
	if [[ -s $pid_file ]]; then
		pid=$(<"$pid_file")
		kill "$pid" 2>/dev/null
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
	fi
done
