"""Where a job reads from and writes to: the base model, the data, the artifacts, storage and secrets."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, StringConstraints, model_validator

from kubetune.api.common import MODEL_NAME_PATTERN, DataUri, DnsSubdomain, Model, OutputUri
from kubetune.api.enums import DatasetFormat, ExportFormat
from kubetune.api.exports import GGUF_MODEL_TYPES, ExportFamily, formats_of


class ModelSource(Model):
    """The base model: a hub id or built-in preset (`name`), or weights in HF layout (`uri`)."""

    name: Annotated[str, StringConstraints(max_length=193, pattern=MODEL_NAME_PATTERN)] | None = Field(
        None, description="Hugging Face model id (org/name) or a built-in preset."
    )
    uri: OutputUri | None = Field(
        None, description="s3:// prefix or local path of a model in Hugging Face layout."
    )
    revision: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        None, description="Hub revision (branch, tag or commit) when loading by name."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless set."
    )


class Dataset(Model):
    """The training data, the held-out data, and how rows become prompts and targets."""

    train: DataUri = Field(description="Training data: s3://, local path, hf://id or builtin:name.")
    validation: DataUri | None = Field(
        None,
        description="Held-out data, in the same forms as train; unset: validationSplit, else no validation.",
    )
    validation_split: float | None = Field(
        None, gt=0, lt=1, description="Fraction of train held out (seeded) when no validation."
    )
    format: DatasetFormat = Field(
        DatasetFormat.AUTO,
        description=(
            "Row format: text (text), prompt-completion (prompt, completion), instruction "
            "(instruction, input, output), chat (messages or ShareGPT conversations); auto (default) "
            "detects it from the rows."
        ),
    )
    template: Literal["auto", "model", "chatml", "alpaca", "none"] = Field(
        "auto",
        description=(
            "Prompt template: model (the tokenizer's chat template), chatml, alpaca, or none (rows "
            "as written). auto (default): the model's chat template if it has one, else chatml for "
            "chat and alpaca for instruction rows; prompt-completion rows stay as written. Text rows "
            "are never templated."
        ),
    )
    train_on_inputs: bool = Field(
        False, description="Compute loss on prompt tokens too (default: completion only)."
    )


def _formats_description() -> str:
    bnb, gguf = (", ".join(formats_of(f)) for f in (ExportFamily.BNB, ExportFamily.GGUF))
    models = ", ".join(sorted(GGUF_MODEL_TYPES))
    return (
        f"Exports of the merged model, each in quantized/<format>/: {bnb} (bitsandbytes, for transformers); "
        f"{gguf} (model.gguf and an Ollama Modelfile, for llama.cpp, Ollama and LM Studio; models of "
        f"type {models})."
    )


class Export(Model):
    """What is made from the trained weights besides the adapter."""

    merge: bool = Field(
        True, description="Merge the LoRA or QLoRA adapter into the base weights (merged/). Default true."
    )
    formats: list[ExportFormat] = Field(
        default_factory=list, max_length=len(ExportFormat), description=_formats_description()
    )
    quantize: list[ExportFormat] | None = Field(
        None,
        max_length=len(ExportFormat),
        description=(
            "Deprecated: the former name of formats (gguf-f16 is no quantization), read as formats "
            "with a warning. Set formats instead; never both."
        ),
    )
    _deprecated: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _quantize_is_formats(self) -> Export:
        """The deprecated quantize, alone, becomes formats; both set are left for RULES to refuse."""
        if self.quantize is not None and "formats" not in self.model_fields_set:
            self.formats, self.quantize = self.quantize, None
            self._deprecated.append("quantize")
        return self

    def deprecations(self, path: str = "spec.export") -> list[str]:
        """A warning for each deprecated field the manifest set (each is read by its new name)."""
        return [f"{path}.{old} is deprecated: rename it to {path}.formats" for old in self._deprecated]


class Output(Model):
    """Where the artifacts go."""

    uri: OutputUri = Field(
        description=(
            "s3://bucket/prefix/ or a local path; artifacts are written under <uri>/<namespace>/<job>/."
        )
    )


class Credentials(Model):
    """Secrets in the job's namespace that the trainer reads as environment variables."""

    storage_secret: DnsSubdomain | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
    )
    hugging_face_secret: DnsSubdomain | None = Field(
        None, description="Secret with HF_TOKEN, for gated or private models and datasets on the hub."
    )


class Storage(Model):
    """The object store behind s3:// URIs."""

    endpoint: Annotated[str, StringConstraints(max_length=512, pattern=r"^https?://.+")] | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, R2); unset: AWS S3."
    )
    region: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="Region of the bucket (AWS_REGION); unset: the SDK's default."
    )
