"""The one error the test control plane raises."""


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, built, started or reached."""
