.PHONY: quickstart test crd

quickstart:  ## Fine-tune the embedded default model on this machine (offline, CPU).
	hack/setup
	.venv/bin/kubetune run examples/quickstart.yaml

test:  ## Lint, type-check and run every test (builds the test control plane once).
	hack/test

crd:  ## Regenerate the CRD (and the chart's copy) from kubetune/api/.
	.venv/bin/kubetune crd > crds/finetunejob.yaml
	cp crds/finetunejob.yaml charts/kubetune/crds/finetunejob.yaml
