"""Kueue in the test control plane: its configuration file, its command line, the webhook
configurations that point the API server at its webhook server on loopback, the API objects
it needs before it starts (:func:`set_up`), and the probe that shows when its webhook is in
effect (:func:`webhook_in_effect`).

Kueue's own deployment reaches its webhooks through a Service; here the API server calls
``https://127.0.0.1:<port>`` directly (``clientConfig.url``). Kueue's internal certificate
management stays on, because with it off Kueue v0.13 insists on a metrics certificate at the
fixed path ``/etc/kueue/metrics/certs``. It keeps the certificates it finds in its Secret
while they are valid for its Service's DNS name, so :func:`webhook_secret` makes them here,
valid for that name and for 127.0.0.1, and writes them to Kueue's cert dir as a kubelet
would mount the Secret; Kueue puts the CA into the webhook configurations itself."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s

KUEUE_NAMESPACE = "kueue-system"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
CA_NAME = "kueue-ca"
"""What Kueue's certificate rotator checks: the CA must be valid for this name, the serving
certificate for ``<WEBHOOK_SERVICE>.<KUEUE_NAMESPACE>.svc``."""
FRAMEWORKS = ("batch/job",)
WEBHOOK_GROUPS = frozenset({"batch", "kueue.x-k8s.io"})
"""Only the webhooks of the integrations in :data:`FRAMEWORKS` and of Kueue's own kinds
are registered: those of Pods, Deployments or StatefulSets would send every such object of
the cluster to Kueue."""


def configuration(
    *, webhook_port: int, cert_dir: Path, metrics_port: int, health_port: int
) -> dict[str, Any]:
    """Kueue's Configuration (``--config``): Jobs only, loopback ports, no leader election."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta1",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": list(FRAMEWORKS)},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": WEBHOOK_SERVICE,
            "webhookSecretName": WEBHOOK_SECRET,
        },
        "leaderElection": {"leaderElect": False},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        # The visibility API server listens on a fixed port (8082) of every address, which
        # parallel control planes would fight over; nothing here needs it.
        "featureGates": {"VisibilityOnDemand": False},
    }


def command(binary: Path, *, config: Path, kubeconfig: Path) -> list[str]:
    return [str(binary), f"--config={config}", f"--kubeconfig={kubeconfig}", "--zap-log-level=2"]


def webhook_configurations(manifests: Path, *, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's Mutating- and ValidatingWebhookConfiguration (from the module's
    ``config/components/webhook/manifests.yaml``), reduced to :data:`WEBHOOK_GROUPS` and
    pointed at ``url`` (``https://127.0.0.1:<port>``); ``ca_bundle`` is base64 PEM."""
    configurations = []
    for document in yaml.safe_load_all(manifests.read_text()):
        if not document:
            continue
        webhooks = [
            _at_url(webhook, url, ca_bundle)
            for webhook in document.get("webhooks") or []
            if _groups(webhook) <= WEBHOOK_GROUPS
        ]
        # The names Kueue's certificate rotator keeps the caBundle of.
        name = f"kueue-{document['metadata']['name']}"
        configurations.append({**document, "metadata": {"name": name}, "webhooks": webhooks})
    return configurations


def _groups(webhook: Mapping[str, Any]) -> set[str]:
    return {group for rule in webhook.get("rules") or [] for group in rule.get("apiGroups") or []}


def _at_url(webhook: Mapping[str, Any], url: str, ca_bundle: str) -> dict[str, Any]:
    path = webhook["clientConfig"]["service"]["path"]
    return {**webhook, "clientConfig": {"url": f"{url}{path}", "caBundle": ca_bundle}}


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[str, rsa.RSAPrivateKey] | None,
    names: list[x509.GeneralName],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        # The rotator replaces certificates that expire within 90 days.
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def webhook_secret() -> dict[str, Any]:
    """The Secret Kueue's certificate rotator reads (``ca.crt``, ``ca.key``, ``tls.crt``,
    ``tls.key``): a CA named :data:`CA_NAME` and a serving certificate for Kueue's Service
    name and 127.0.0.1."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _certificate(CA_NAME, ca_key, None, [x509.DNSName(CA_NAME)])
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = [
        x509.DNSName(f"{WEBHOOK_SERVICE}.{KUEUE_NAMESPACE}.svc"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = _certificate(f"{WEBHOOK_SERVICE}.{KUEUE_NAMESPACE}.svc", key, (CA_NAME, ca_key), names)

    # The rotator parses the CA key as PKCS #1 RSA.
    def private(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    data = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": private(ca_key),
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM),
        "tls.key": private(key),
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": KUEUE_NAMESPACE},
        "type": "Opaque",
        "data": {name: base64.b64encode(value).decode("ascii") for name, value in data.items()},
    }


def set_up(api: k8s.ApiClient, *, manifests: Path, cert_dir: Path, webhook_port: int) -> None:
    """What Kueue needs before it starts: its namespace, its webhook Secret (see
    :func:`webhook_secret`), the Secret's files in ``cert_dir``, and the webhook
    configurations (see :func:`webhook_configurations`) for its webhook server on
    ``webhook_port``."""
    secret = webhook_secret()
    # Where a kubelet would mount the Secret: Kueue waits for the files, its webhook
    # server serves them.
    cert_dir.mkdir(exist_ok=True)
    for name, value in secret["data"].items():
        path = cert_dir / name
        path.write_bytes(base64.b64decode(value))
        path.chmod(0o600)
    # Kueue's certificate rotator only reports ready once it has put the CA into these
    # configurations, so they exist before it starts.
    configurations = webhook_configurations(
        manifests, url=f"https://127.0.0.1:{webhook_port}", ca_bundle=secret["data"]["ca.crt"]
    )
    core = k8s.CoreV1Api(api)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=KUEUE_NAMESPACE)))
    secret_body = k8s.V1Secret.from_dict(secret)
    assert secret_body is not None
    core.create_namespaced_secret(KUEUE_NAMESPACE, secret_body)
    admission = k8s.AdmissionregistrationV1Api(api)
    for body in configurations:
        if body["kind"] == "MutatingWebhookConfiguration":
            mutating = k8s.V1MutatingWebhookConfiguration.from_dict(body)
            assert mutating is not None
            admission.create_mutating_webhook_configuration(mutating)
        else:
            validating = k8s.V1ValidatingWebhookConfiguration.from_dict(body)
            assert validating is not None
            admission.create_validating_webhook_configuration(validating)


WEBHOOK_PROBE: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "kueue-webhook-probe", "labels": {"kueue.x-k8s.io/queue-name": "probe"}},
    "spec": {
        "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "probe", "image": "probe"}]}}
    },
}
"""A queued Job, only ever created as a dry run (see :func:`webhook_in_effect`)."""


def webhook_in_effect(api: k8s.ApiClient) -> bool:
    """Whether the API server calls Kueue's Job webhook yet. It picks up new webhook
    configurations asynchronously; the webhook suspends a queued Job, so a dry run shows
    when it is in effect."""
    probe = k8s.V1Job.from_dict(WEBHOOK_PROBE)
    assert probe is not None
    try:
        job = k8s.BatchV1Api(api).create_namespaced_job("default", probe, dry_run="All")
    except k8s.ApiException:
        return False
    return bool(job.spec and job.spec.suspend)
