"""The operator's configuration, and the jobs it refuses to run under it (pure)."""

from __future__ import annotations

import fnmatch
import importlib.metadata
from dataclasses import dataclass

from kubetune import api

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


def _version() -> str:
    try:
        return importlib.metadata.version("kubetune")
    except importlib.metadata.PackageNotFoundError:
        return "latest"


DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{_version()}"


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator adds to every plan; set from the command line or the chart."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    image_pull_policy: str = "IfNotPresent"
    termination_grace_seconds: int = 120
    # spec.image must match one of these shell patterns (fnmatch); empty: the trainer image's
    # repository, any tag or digest. "*" allows every image.
    allowed_images: tuple[str, ...] = ()
    # Namespaces whose FineTuneJobs may name spec.credentials Secrets (injected as env);
    # "*" is every namespace. Empty: none may.
    secrets_namespaces: tuple[str, ...] = ()

    def image_patterns(self) -> tuple[str, ...]:
        if self.allowed_images:
            return self.allowed_images
        repository = _repository(self.trainer_image)
        return (self.trainer_image, f"{repository}:*", f"{repository}@*")


def _repository(image: str) -> str:
    """The image reference without its tag or digest (pure)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def image_allowed(image: str, config: OperatorConfig) -> bool:
    return any(fnmatch.fnmatchcase(image, pattern) for pattern in config.image_patterns())


def admission(job: api.FineTuneJob, config: OperatorConfig) -> tuple[str, str] | None:
    """Why the operator refuses to run ``job`` (a reason and a message), or None (pure).

    Anyone who may create a FineTuneJob would otherwise run any image, with any Secret of the
    namespace in its environment: the operator's configuration decides both.
    """
    spec = job.spec
    if spec.image is not None and not image_allowed(spec.image, config):
        allowed = ", ".join(config.image_patterns())
        return (
            "ImageNotAllowed",
            f"spec.image {spec.image} is not allowed by the operator (allowed: {allowed}); "
            "ask the cluster admin to add it to the chart's trainer.allowedImages",
        )
    network = spec.resources.network
    if network and config.gpu_resource in network.extended_resources:
        return (
            "InvalidResources",
            f"spec.resources.network.extendedResources names {config.gpu_resource}, the operator's GPU "
            "resource: set spec.resources.gpus instead",
        )
    secrets = [s for s in (spec.credentials.storage_secret, spec.credentials.hugging_face_secret) if s]
    allowed_ns = config.secrets_namespaces
    if secrets and "*" not in allowed_ns and job.metadata.namespace not in allowed_ns:
        return (
            "CredentialsNotAllowed",
            f"spec.credentials names Secret(s) {', '.join(secrets)}, but the operator injects Secrets "
            f"only for namespaces it is configured for (chart value trainer.secretsNamespaces); "
            f"{job.metadata.namespace} is not one of them. Use workload identity (IRSA, GKE "
            "Workload Identity) or ask the cluster admin to allow this namespace",
        )
    return None
