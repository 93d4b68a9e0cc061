"""The FineTuneJob API (kubetune.io/v1alpha1): the one source of truth.

The CRD in ``crds/`` is generated from these models (``kubetune crd``), ``kubetune validate``
checks manifests with them, the operator plans from them and the trainer runs them. Every
cross-field rule is written once in ``RULES`` as a CEL expression for the API server and as
the equivalent Python predicate for offline validation. Every field carries a description:
it is what ``kubectl explain`` shows.
"""

from kubetune.api.cluster import Resources, Scheduling, Toleration
from kubetune.api.common import (
    API_VERSION,
    CHECKPOINTING_FROM_PARAMETERS,
    DATA_URI_PATTERN,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    GROUP,
    KIND,
    MODEL_NAME_PATTERN,
    OUTPUT_URI_PATTERN,
    PARENT_SEGMENT,
    PLURAL,
    QUANTITY_PATTERN,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    DataUri,
    DnsLabel,
    DnsSubdomain,
    Model,
    OutputUri,
    Quantity,
    ShortStr,
)
from kubetune.api.enums import DatasetFormat, EvalMetric, ExportFormat, Method, Phase, Stage
from kubetune.api.evaluation import Evaluation, Harness, HarnessTask, Regression
from kubetune.api.exports import (
    EXPORTS,
    GGUF_ARCHITECTURES,
    GGUF_MODEL_TYPES,
    ExportFamily,
    ExportTraits,
    formats_of,
)
from kubetune.api.resource import FineTuneJob, FineTuneJobSpec, ObjectMeta
from kubetune.api.rules import MUTABLE_WHEN_STARTED, RULES, Rule, started
from kubetune.api.sources import Credentials, Dataset, Export, ModelSource, Output, Storage
from kubetune.api.status import Artifacts, Condition, FineTuneJobStatus, Progress, Results, ScoreDrop
from kubetune.api.training import EarlyStopping, Lora, ModuleName, Quantization, Training

__all__ = [
    "API_VERSION",
    "CHECKPOINTING_FROM_PARAMETERS",
    "DATA_URI_PATTERN",
    "DNS_LABEL_PATTERN",
    "DNS_SUBDOMAIN_PATTERN",
    "EXPORTS",
    "GGUF_ARCHITECTURES",
    "GGUF_MODEL_TYPES",
    "GROUP",
    "KIND",
    "MODEL_NAME_PATTERN",
    "MUTABLE_WHEN_STARTED",
    "OUTPUT_URI_PATTERN",
    "PARENT_SEGMENT",
    "PLURAL",
    "QUANTITY_PATTERN",
    "RULES",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "Artifacts",
    "Condition",
    "Credentials",
    "DataUri",
    "Dataset",
    "DatasetFormat",
    "DnsLabel",
    "DnsSubdomain",
    "EarlyStopping",
    "EvalMetric",
    "Evaluation",
    "Export",
    "ExportFamily",
    "ExportFormat",
    "ExportTraits",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Harness",
    "HarnessTask",
    "Lora",
    "Method",
    "Model",
    "ModelSource",
    "ModuleName",
    "ObjectMeta",
    "Output",
    "OutputUri",
    "Phase",
    "Progress",
    "Quantity",
    "Quantization",
    "Regression",
    "Resources",
    "Results",
    "Rule",
    "Scheduling",
    "ScoreDrop",
    "ShortStr",
    "Stage",
    "Storage",
    "Toleration",
    "Training",
    "formats_of",
    "started",
]
