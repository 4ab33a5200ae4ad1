#!/usr/bin/env bash
# Submit a cluster data-prep build: an array of N build tasks, then a merge (and verify) job that
# starts only when every task succeeded (afterok). Prints the two job ids.
#
#   slurm/prepare_data.sh /shared/world_v2 16 corpus=world_v2 corpus.root=/data/world_v2
#
# SBATCH_PARTITION / SBATCH_ACCOUNT (read by sbatch itself) pick where both jobs run; SBATCH_EXTRA
# holds more sbatch options for both (e.g. SBATCH_EXTRA="--cpus-per-task=32 --time=4:00:00").
set -euo pipefail

if (($# < 2)); then
	echo "usage: slurm/prepare_data.sh DIR N [data_prep overrides...]" >&2
	exit 2
fi
out_dir=$1
parts=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
read -ra extra <<<"${SBATCH_EXTRA:-}"
mkdir -p "$out_dir"

array=$(sbatch --parsable "${extra[@]}" --array="0-$((parts - 1))" "$here/data_prep.sbatch" "$out_dir" "$@")
array=${array%%;*} # --parsable prints "id" or "id;cluster"
merge=$(sbatch --parsable "${extra[@]}" --job-name=rwkv-data-merge --dependency="afterok:$array" --ntasks=1 \
	--wrap="$(printf '%q ' "$PYTHON" -m data_prep.merge "$out_dir") && $(printf '%q ' "$PYTHON" -m data_prep.verify "$out_dir")")
merge=${merge%%;*}
echo "build array: $array ($parts tasks)"
echo "merge + verify: $merge (after all of $array succeed)"
