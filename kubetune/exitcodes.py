"""Exit codes of `kubetune trainer`, shared with the operator's Job pod failure policy.

The trainer exits with CONFIG_ERROR_EXIT_CODE when its job cannot run as specified (a bad
spec, a missing model or dataset, wrong credentials): retrying would fail the same way, so the
Job's podFailurePolicy fails the whole Job at once instead of spending backoffLimit on it.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
FAILURE: Final = 1  # anything that may succeed on a retry (node loss, storage hiccup, OOM)
CONFIG_ERROR_EXIT_CODE: Final = 3
