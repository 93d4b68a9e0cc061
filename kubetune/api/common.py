"""Names, patterns and the base class every FineTuneJob API object shares."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
# training.gradientCheckpointing unset: on for models with at least this many base parameters.
CHECKPOINTING_FROM_PARAMETERS = 1_000_000_000

# An HF-style id: `name` or `org/name`, letters, digits and `-_.`; never free text.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
# s3://bucket/key, file://path or a local path; data may also name a dataset on the hub
# (hf://org/name) or one shipped with kubetune (builtin:name). A `..` segment is refused by RULES
# (the API server's regular expressions have no look-ahead).
OUTPUT_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file://.+|[^:]+)$"
DATA_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file://.+|hf://[A-Za-z0-9._/-]+|builtin:[a-z0-9-]+|[^:]+)$"
PARENT_SEGMENT = r"(^|/)[.][.](/|$)"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
# spec.resources.network. Written with [.] instead of an escaped dot: EXTENDED_RESOURCE_PATTERN and
# NCCL_ENV_PATTERN check map keys, which have no schema pattern, so they are also CEL string literals.
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
EXTENDED_RESOURCE_PATTERN = rf"^{_DNS_SUBDOMAIN}/[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
NCCL_ENV_PATTERN = r"^NCCL_[A-Z0-9_]+$"
# A Multus network attachment in the short form of k8s.v1.cni.cncf.io/networks:
# [namespace/]name[@interface] (a Linux interface name has at most 15 characters).
NETWORK_ATTACHMENT_PATTERN = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?{_DNS_SUBDOMAIN}(@[A-Za-z0-9_.-]{{1,15}})?$"

ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=253)]
DnsLabel = Annotated[str, StringConstraints(max_length=63, pattern=DNS_LABEL_PATTERN)]
DnsSubdomain = Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
Quantity = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY_PATTERN)]
DataUri = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=DATA_URI_PATTERN)]
OutputUri = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=OUTPUT_URI_PATTERN)]
NetworkAttachment = Annotated[str, StringConstraints(max_length=333, pattern=NETWORK_ATTACHMENT_PATTERN)]


class Model(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
