"""kubetune: fine-tune LLMs on Kubernetes."""
