"""A node agent for the local cluster: pods bound to its Node run for real, as local processes.

It stands in for a kubelet on one machine: it registers a Node and keeps its Lease fresh, runs each
container's command in the project's virtual environment inside a private mount namespace (volumes
bind-mounted at their real paths), gives every pod its own loopback address, probes, restarts and
reports status, and stops pods that are deleted. It needs root. See docs/dev-cluster.md.
"""
