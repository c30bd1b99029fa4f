"""The local cluster of the README demo and the integration tests: a real control plane plus kwok."""
