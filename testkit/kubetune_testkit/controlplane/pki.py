"""Certificates and kubeconfigs of the test control plane (and of the e2e node): the
cluster CA, the front-proxy CA and the certificates they sign, made with trustme, and the
service account key pair. Each certificate and its key are written as ``<stem>.crt`` and
``<stem>.key``, which is what the Kubernetes binaries read."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

CONTEXT_NAME = "kubetune-test"


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path

    @classmethod
    def write(cls, directory: Path, stem: str, cert: bytes, key: bytes) -> Credential:
        credential = cls(directory / f"{stem}.crt", directory / f"{stem}.key")
        credential.cert.write_bytes(cert)
        credential.cert.chmod(0o644)
        credential.key.write_bytes(key)
        credential.key.chmod(0o600)
        return credential


class CertificateAuthority:
    """A CA whose certificate and key are ``<stem>.crt`` and ``<stem>.key`` in a directory;
    what it issues goes to that directory too, unless told otherwise."""

    def __init__(self, authority: trustme.CA, credential: Credential) -> None:
        self._authority = authority
        self.credential = credential

    @classmethod
    def create(cls, directory: Path, stem: str, name: str) -> CertificateAuthority:
        """A new self-signed CA; ``name`` is its organizational unit."""
        authority = trustme.CA(organization_name="kubetune", organization_unit_name=name)
        pem = (authority.cert_pem.bytes(), authority.private_key_pem.bytes())
        return cls(authority, Credential.write(directory, stem, *pem))

    @classmethod
    def load(cls, directory: Path, stem: str) -> CertificateAuthority:
        """An existing CA, e.g. the cluster CA of a running control plane."""
        credential = Credential(directory / f"{stem}.crt", directory / f"{stem}.key")
        return cls(trustme.CA.from_pem(credential.cert.read_bytes(), credential.key.read_bytes()), credential)

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        organization: str | None = None,
        hosts: Sequence[str] = (),
        directory: Path | None = None,
    ) -> Credential:
        """A certificate for clients and servers alike: to the API server, ``common_name``
        is the user and ``organization`` the group (without one, trustme names itself
        there: a group nothing is bound to); ``hosts`` are the DNS names and IP addresses
        a server answers on. Written under ``directory`` (default: the CA's)."""
        # trustme marks the subject alternative names critical, and Go refuses a critical
        # extension that is empty: a client certificate names localhost.
        leaf = self._authority.issue_cert(
            *(hosts or ["localhost"]), common_name=common_name, organization_name=organization
        )
        return Credential.write(
            directory or self.credential.cert.parent,
            stem,
            leaf.cert_chain_pems[0].bytes(),
            leaf.private_key_pem.bytes(),
        )


class ClusterPki:
    """Everything a kubeadm-style control plane needs, written under ``directory``: the
    cluster CA, the front-proxy CA (aggregation layer and delegated authentication) and
    the service account signing key pair."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cluster = CertificateAuthority.create(directory, "ca", "kubetune-test-ca")
        self.ca = self.cluster.credential
        self.front_proxy = CertificateAuthority.create(
            directory, "front-proxy-ca", "kubetune-test-front-proxy-ca"
        )
        self.front_proxy_client = self.front_proxy.issue("front-proxy-client", "front-proxy-client")
        # Kubernetes accepts RSA and ECDSA service account keys; RSA (RS256) is what
        # every token consumer understands. A key pair, no certificate: not trustme's.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.service_account = Credential(directory / "sa.pub", directory / "sa.key")
        self.service_account.cert.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.service_account.key.write_bytes(
            sa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.service_account.key.chmod(0o600)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, credential: Credential) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT_NAME, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(credential.cert),
                    "client-key-data": _b64(credential.key),
                },
            }
        ],
        "contexts": [
            {"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": user, "namespace": "default"}}
        ],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
