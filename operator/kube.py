"""A small JSON client for the few kinds the operator touches.

It sends and returns the API server's own JSON (plain dicts) through the kubernetes
client's ApiClient (authentication, TLS, token refresh). The generated typed models are
not used: they would re-validate every object and could drop fields this client's
version does not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubetune import api

# kind -> (API path prefix, plural)
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
    api.KIND: (f"/apis/{api.API_VERSION}", api.PLURAL),
}
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30.0


def status_of(error: BaseException) -> int | None:
    return getattr(error, "status", None) if isinstance(error, ApiException) else None


def message_of(error: ApiException) -> str:
    """The API server's own words for a refused request (its Status message), else the HTTP status."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{error.status}: {message}" if message else str(error.status)


class Kube:
    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def path(self, kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        prefix, plural = KINDS[kind]
        out = f"{prefix}/namespaces/{namespace}/{plural}"
        if name:
            out += f"/{name}"
        if subresource:
            out += f"/{subresource}"
        return out

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = self.client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(*params, _request_timeout=REQUEST_TIMEOUT)
        data = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise ApiException(
                status=response.status, reason=response.reason, body=data.decode(errors="replace")
            )
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("POST", self.path(obj["kind"], meta["namespace"]), body=obj)

    def patch(
        self,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        return self.request(
            "PATCH", self.path(kind, namespace, name, subresource), body=patch, content_type=MERGE_PATCH
        )

    def list(
        self,
        kind: str,
        namespace: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector, "fieldSelector": field_selector}
        found = self.request("GET", self.path(kind, namespace), query={k: v for k, v in query.items() if v})
        items: list[dict[str, Any]] = found.get("items") or []
        return items

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", self.path(kind, namespace, name))
        except ApiException as error:
            if error.status != 404:
                raise
