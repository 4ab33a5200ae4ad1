"""Corpus preparation: the RWKV World tokenizer and packing documents into binidx shards."""

import os


def usable_cpus() -> int:
    """The CPUs this process may run on (a Slurm task's allocation, not the node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1
