"""Deprecated spec fields against the real API server: the CRD still takes them, the operator
reads them by their new names and says so once in a Warning event; both names at once are refused."""

from __future__ import annotations

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubetune import contract
from kubetune.operator import planning
from kubetune.operator.kube import Kube
from kubetune.operator.reconcile import Reconciler
from kubetune_testkit.manifests import finetunejob

pytestmark = pytest.mark.controlplane


def test_export_quantize_runs_as_formats_with_one_warning_event(kube: Kube, ns: str) -> None:
    kube.create(finetunejob("old-name", ns, export={"merge": True, "quantize": ["bnb-4bit"]}))
    reconciler = Reconciler(kube, planning.OperatorConfig(trainer_image="registry.test/t:1"))
    assert reconciler.reconcile(ns, "old-name").phase == "Pending"
    reconciler.reconcile(ns, "old-name")  # the status records the generation: no second warning

    found = kube.list("Event", ns, field_selector="involvedObject.name=old-name")
    warnings = [(e["type"], e["message"]) for e in found if e["reason"] == "DeprecatedField"]
    assert warnings == [("Warning", "spec.export.quantize is deprecated: rename it to spec.export.formats")]
    config_map = kube.get("ConfigMap", ns, planning.Names.of("old-name").config_map)
    assert config_map is not None
    resolved = yaml.safe_load(config_map["data"][contract.CONFIG_FILE])
    assert resolved["spec"]["export"] == {"merge": True, "formats": ["bnb-4bit"]}  # what the trainer reads

    kube.create(finetunejob("new-name", ns, export={"merge": True, "formats": ["bnb-4bit"]}))
    reconciler.reconcile(ns, "new-name")
    found = kube.list("Event", ns, field_selector="involvedObject.name=new-name")
    assert [e for e in found if e["reason"] == "DeprecatedField"] == []


def test_the_api_server_refuses_both_names(kube: Kube, ns: str) -> None:
    with pytest.raises(ApiException) as refused:
        kube.create(finetunejob("both", ns, export={"formats": ["bnb-4bit"], "quantize": ["bnb-4bit"]}))
    assert refused.value.status == 422
    assert "spec.export.quantize: Invalid value" in str(refused.value.body)
    assert "set formats or its deprecated name quantize, not both" in str(refused.value.body)
