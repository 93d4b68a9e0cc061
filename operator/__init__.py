"""The kopf operator: FineTuneJob in, trainer Job out, status and events back.

- ``planning``: the pure plan of a FineTuneJob's objects (ConfigMap with the resolved spec,
  ServiceAccount, Role and RoleBinding for this one job, the trainer Job; for several nodes
  an Indexed Job and a headless Service).
- ``observe``: the pure mapping of the trainer Job and its pods to phase, conditions, events;
  ``workload``: what it reads of them, once, into a snapshot (the trainer container's state,
  disruptions, counts); ``conditions``: the FineTuneJob's condition types and how one is set.
- ``reconcile``: one idempotent pass that applies both; ``handlers``: the kopf triggers;
  ``main``: the process (kopf, ``/metrics``, ``/healthz``); ``metrics``: Prometheus metrics;
  ``rbac``: the rules the operator needs; ``testing``: the operator in-process for tests.

What the trainer pod and the trainer agree on (environment, paths, ports, exit codes, the
artifact layout) is ``kubetune.contract``: the pod gets its job's namespace and name, the
resolved job at ``contract.CONFIG_PATH`` (named on its command line) and a service account
token allowed to read its FineTuneJob and patch its status. It exits 3 when its
configuration cannot work, which fails the Job without retries.
"""
