"""Installing CustomResourceDefinitions: create or replace them, then wait until the API
server serves them. The control plane installs its ``crds`` this way, and the operator
tests the FineTuneJob CRD."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from .errors import ControlPlaneError
from .processes import Process, wait_until

CrdSource = Path | str | Mapping[str, Any]
"""A CRD manifest, a YAML file of them (several documents allowed), or a directory of
``*.yaml``/``*.yml`` files."""


def install_crds(
    api: k8s.ApiClient, *sources: CrdSource, timeout: float = 60.0, processes: Iterable[Process] = ()
) -> list[str]:
    """Create or replace the CustomResourceDefinitions of ``sources`` and wait until they
    are established (failing early if one of ``processes`` exits). Returns their names."""
    extensions = k8s.ApiextensionsV1Api(api)
    names = [_apply(extensions, origin, manifest) for origin, manifest in _manifests(sources)]
    for name in names:
        wait_until(
            functools.partial(_established, extensions, name),
            what=f"CRD {name} to be established",
            timeout=timeout,
            processes=processes,
        )
    return names


def _manifests(sources: Iterable[CrdSource]) -> list[tuple[str, Mapping[str, Any]]]:
    """(where it came from, manifest) for every CRD of ``sources``; anything but a CRD is an error."""
    manifests: list[tuple[str, Mapping[str, Any]]] = []
    for source in sources:
        if isinstance(source, Mapping):
            manifests.append(("manifest", source))
            continue
        path = Path(source)
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        for file in files:
            try:
                documents = list(yaml.safe_load_all(file.read_text()))
            except (OSError, yaml.YAMLError) as error:
                raise ControlPlaneError(f"cannot read CRDs from {file}: {error}") from error
            manifests += [(str(file), doc) for doc in documents if doc]
    for origin, manifest in manifests:
        if manifest.get("kind") != "CustomResourceDefinition":
            raise ControlPlaneError(
                f"{origin}: expected a CustomResourceDefinition, got {manifest.get('kind')!r}"
            )
    return manifests


def _apply(extensions: k8s.ApiextensionsV1Api, origin: str, manifest: Mapping[str, Any]) -> str:
    crd = k8s.V1CustomResourceDefinition.from_dict(dict(manifest))
    if crd is None or crd.metadata is None or not crd.metadata.name:
        raise ControlPlaneError(f"{origin}: CustomResourceDefinition without metadata.name")
    name = crd.metadata.name
    try:
        try:
            extensions.create_custom_resource_definition(crd)
        except k8s.ApiException as error:
            if error.status != 409:
                raise
            current = extensions.read_custom_resource_definition(name)
            crd.metadata.resource_version = current.metadata.resource_version if current.metadata else None
            extensions.replace_custom_resource_definition(name, crd)
    except k8s.ApiException as error:
        raise ControlPlaneError(f"{origin}: installing CRD {name} failed: {error.body or error}") from error
    return name


def _established(extensions: k8s.ApiextensionsV1Api, name: str) -> bool:
    status = extensions.read_custom_resource_definition(name).status
    conditions = (status.conditions if status else None) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)
