"""The local cluster of the README demo and the integration tests: a real control plane (`controlplane`) with
kwok's simulated nodes (`nodes`), a node agent that runs pods for real (`agent`), its life (`lifecycle`:
up, down, status) and the demo (`demo`); ``python -m kubetune.dev`` is its command line."""
