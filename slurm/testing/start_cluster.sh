#!/usr/bin/env bash
# Start a one-node Slurm cluster for the tests (Debian's slurmctld, slurmd, munge; run as root):
#   eval "$(slurm/testing/start_cluster.sh DIR)"   # exports SLURM_CONF; DIR holds all its state
#   slurm/testing/stop_cluster.sh DIR               # stops it by the PIDs in DIR
# Settings that make it come up in about a second on a CI machine: munged runs as the munge
# user with /run/munge owned by munge; process tracking without cgroups
# (proctrack/linuxproc, task/none); no accounting (read job states with scontrol, not sacct);
# a credential lifetime of 10 s, since Slurm 22.05 holds a requeued job for cred_expire + 1 s.
set -euo pipefail

dir=$(mkdir -p "$1" && cd "$1" && pwd)
mkdir -p "$dir/state" "$dir/spool"

if ! pgrep -u munge -x munged >/dev/null; then
	install -d -o munge -g munge -m 0755 /run/munge
	runuser -u munge -- /usr/sbin/munged --force
	cp /run/munge/munged.pid "$dir/munged.pid" # started here: stopped by stop_cluster.sh too
fi

cat >"$dir/slurm.conf" <<CONF
ClusterName=testcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
MinJobAge=600
NodeName=localhost CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF" -i
/usr/sbin/slurmd -f "$SLURM_CONF" -N localhost
for _ in $(seq 100); do # up to 10 s for the node to be idle
	if [[ $(sinfo -h -N -o %t 2>/dev/null) == idle ]]; then
		echo "export SLURM_CONF=$SLURM_CONF"
		exit 0
	fi
	sleep 0.1
done
echo "the Slurm node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
