"""The pod contract: what the operator's trainer pod and `kubetune trainer` agree on.

The operator writes a pod spec (``kubetune.operator.planning``) and the trainer image runs in
it (``kubetune.trainer``); everything one side sets and the other reads is named here once:
the environment, the mounted paths, the ports, the exit codes and the layout of what a run
publishes (``kubetune.artifacts`` reads that layout back). Pure constants and one pure
function: the operator imports this module, so it never imports torch.

Exit codes. The trainer exits with CONFIG_ERROR_EXIT_CODE when its job cannot run as specified
(a bad spec, a missing model or dataset, wrong credentials): retrying would fail the same way,
so the Job's podFailurePolicy fails the whole Job at once instead of spending backoffLimit on
it. It exits with PEER_LOST_EXIT_CODE when another process of a multi-node job went away (a
preempted or failed node) while this one was healthy: the Job ignores that failure, like a
DisruptionTarget, and the operator bounds how often it is retried (spec.disruptionLimit).
It exits with REGRESSED_EXIT_CODE when the job ran and published its artifacts but its
harness scores dropped beyond spec.evaluation.regression.maxDrop with failOnRegression set:
a retry would only repeat the run, so the Job fails at once too. Under torchrun every process
records its own code and `kubetune trainer` exits with the most telling one (``combined``),
since torchrun itself only says that a worker failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# --- the container -----------------------------------------------------------------------

TRAINER_CONTAINER: Final = "trainer"  # the container's name, matched by the pod failure policy
TRAINER_UID: Final = 1000  # the trainer image's USER; the pod runs as it
TRAINER_COMMAND: Final = ("kubetune", "trainer")  # the entry point; `--config CONFIG_PATH` follows

# --- mounted paths -----------------------------------------------------------------------

CONFIG_DIR: Final = "/etc/kubetune"  # the per-attempt ConfigMap, read-only
CONFIG_FILE: Final = "job.yaml"  # its key: the resolved FineTuneJob (every default applied)
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_FILE}"
SCRATCH_DIR: Final = "/var/cache/kubetune"  # emptyDir: HOME, caches, the trainer's work folder
WORK_DIR: Final = f"{SCRATCH_DIR}/work"  # the trainer's default WORKDIR_ENV in the pod
TMP_DIR: Final = "/tmp"  # emptyDir: the root filesystem is read-only
SHM_DIR: Final = "/dev/shm"  # memory-backed emptyDir for the data loaders and NCCL

# --- ports -------------------------------------------------------------------------------

METRICS_PORT: Final = 9400  # the trainer's /metrics (METRICS_PORT_ENV's default)
MASTER_PORT: Final = 29500  # the c10d rendezvous on node rank 0 of a multi-node job

# --- environment the operator sets in the pod --------------------------------------------

JOB_NAMESPACE_ENV: Final = "KUBETUNE_JOB_NAMESPACE"  # with JOB_NAME_ENV: the FineTuneJob to report to
JOB_NAME_ENV: Final = "KUBETUNE_JOB_NAME"
GRACE_ENV: Final = "KUBETUNE_GRACE_SECONDS"  # the pod's termination grace period
NUM_NODES_ENV: Final = "KUBETUNE_NUM_NODES"  # multi-node only, as are the three below
NODE_RANK_ENV: Final = "KUBETUNE_NODE_RANK"  # the Indexed Job's completion index
MASTER_ADDR_ENV: Final = "MASTER_ADDR"  # node rank 0's pod DNS name (torch's own variable)
MASTER_PORT_ENV: Final = "MASTER_PORT"

# --- environment the trainer reads that the operator leaves unset ------------------------

METRICS_PORT_ENV: Final = "KUBETUNE_METRICS_PORT"  # 0: no /metrics
STATUS_INTERVAL_ENV: Final = "KUBETUNE_STATUS_INTERVAL"  # seconds between progress patches
STATUS_TIMEOUT_ENV: Final = "KUBETUNE_STATUS_TIMEOUT"  # seconds a status patch may take
COLLECTIVE_TIMEOUT_ENV: Final = "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS"  # overrides the spec's
WORKDIR_ENV: Final = "KUBETUNE_WORKDIR"  # local work folder (default: WORK_DIR in the pod)
OUTPUT_ENV: Final = "KUBETUNE_OUTPUT"  # publish here instead of spec.output.uri
CACHE_ENV: Final = "KUBETUNE_CACHE"  # the trainer's cache root (default: $XDG_CACHE_HOME/kubetune)
EXIT_DIR_ENV: Final = "KUBETUNE_EXIT_DIR"  # set by the launcher: where each rank records its code

# --- what a run publishes under <output>/<namespace>/<job>/ ------------------------------

ADAPTER: Final = "adapter"  # folder: the PEFT adapter (LoRA, QLoRA)
MERGED: Final = "merged"  # folder: full weights (full fine-tuning, or the merged adapter)
QUANTIZED: Final = "quantized"  # folder of one folder per export format: quantized/<format>/
GGUF_MODEL: Final = "model.gguf"  # the file of a quantized/gguf-*/ export
METRICS: Final = "metrics.json"
PREDICTIONS: Final = "predictions.jsonl"
REPORT: Final = "report.png"  # loss curves (and harness scores)
MODEL_CARD: Final = "README.md"
MANIFEST: Final = "manifest.json"  # every file with size and SHA-256; written last
CHECKPOINTS: Final = "checkpoints"  # folder: checkpoints/step-N/, while training

# --- exit codes --------------------------------------------------------------------------

OK: Final = 0
FAILURE: Final = 1  # anything that may succeed on a retry (storage hiccup, OOM, a crash)
CONFIG_ERROR_EXIT_CODE: Final = 3
PEER_LOST_EXIT_CODE: Final = 4
REGRESSED_EXIT_CODE: Final = 5


def combined(recorded: Iterable[int], launcher: int, *, nodes: int) -> int:
    """The pod's exit code from its processes' recorded codes and torchrun's own (pure).

    A configuration error explains everything else, then a failure of this pod's own; peers
    lost come last. torchrun failing while no process recorded a failure of its own (a process
    killed, or aborted by the NCCL watchdog when a peer vanished) is a lost peer on a
    multi-node job, a failure on one node. A misjudged own crash costs a bounded retry.
    """
    codes = set(recorded)
    for code in (CONFIG_ERROR_EXIT_CODE, FAILURE, REGRESSED_EXIT_CODE):
        if code in codes:
            return code
    if codes - {OK, PEER_LOST_EXIT_CODE}:
        return FAILURE
    if launcher == OK:
        return OK
    # On one node there is no peer outside this pod: a lost process is this pod's failure.
    return PEER_LOST_EXIT_CODE if nodes > 1 else FAILURE
