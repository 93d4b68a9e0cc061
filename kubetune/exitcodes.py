"""Exit codes of `kubetune trainer`, shared with the operator's Job pod failure policy.

The trainer exits with CONFIG_ERROR_EXIT_CODE when its job cannot run as specified (a bad
spec, a missing model or dataset, wrong credentials): retrying would fail the same way, so the
Job's podFailurePolicy fails the whole Job at once instead of spending backoffLimit on it.

It exits with PEER_LOST_EXIT_CODE when another process of a multi-node job went away (a
preempted or failed node) while this one was healthy: the Job ignores that failure, like a
DisruptionTarget, and the operator bounds how often it is retried (spec.disruptionLimit).
It exits with REGRESSED_EXIT_CODE when the job ran and published its artifacts but its
harness scores dropped beyond spec.evaluation.regression.maxDrop with failOnRegression set:
a retry would only repeat the run, so the Job fails at once too.

Under torchrun every process records its own code and `kubetune trainer` exits with the most
telling one, since torchrun itself only says that a worker failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

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
