"""Fixtures shared by every test tier: the test control plane and the test S3 server."""

pytest_plugins = ["kubetune.testing.controlplane_fixtures", "kubetune.testing.s3_fixtures"]
