"""kubetune's test kit: a real Kubernetes control plane (and an e2e node) on loopback, an
S3-compatible server, Prometheus, the operator run in-process, and the pytest plugins that
start them for the tests.

Not part of the kubetune wheel or the images: it lives in ``testkit/`` as a distribution of its
own (``kubetune-testkit``), which the dev extra installs, editable, from this checkout. It
builds its binaries with the scripts under ``hack/``, so it only works from a checkout.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this kit is installed from (``testkit/kubetune_testkit/`` -> the root)."""
