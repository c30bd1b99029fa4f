"""kubetune: declare LoRA post-training and vLLM serving as Kubernetes resources."""

__version__ = "0.1.0"
