"""Test support: a real Kubernetes control plane on loopback and its pytest fixtures."""
