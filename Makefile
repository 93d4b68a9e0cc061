.PHONY: quickstart test test-fast test-trainer test-operator test-e2e crd

quickstart:  ## Fine-tune the embedded default model on this machine (offline, CPU).
	hack/setup
	.venv/bin/kubetune run examples/quickstart.yaml

test:  ## Lint, type-check and run every test (builds the test binaries and images once).
	hack/test all

test-fast:  ## Lint, type-check, unit and data tests: nothing to build, a few minutes.
	hack/test fast

test-trainer:  ## Training on the CPU and storage against the test S3 server.
	hack/test trainer

test-operator:  ## The operator, control plane, chart and monitoring tests.
	hack/test operator

test-e2e:  ## The images on a real kubelet node (root).
	hack/test e2e

crd:  ## Regenerate the CRD (and the chart's copy) from kubetune/api/.
	.venv/bin/kubetune crd > crds/finetunejob.yaml
	cp crds/finetunejob.yaml charts/kubetune/crds/finetunejob.yaml
