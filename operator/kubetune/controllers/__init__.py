"""What the operator does for each kind, without kopf: `training` (FineTuneJobs) and `serving` (ModelServers).

A controller function takes plain inputs, a `Context` (the API client, the configuration, the status writer,
the indexes as plain mappings) and the object's (namespace, name), and calls the pure layers (planner/,
render/, status/, adapters/) in between reads and writes through k8s/. handlers/ calls them from kopf's watch
events; unit tests call them with a Context built from dicts and a recording client. `mounts` reads the
FailedMount Events of waiting pods; `metrics` counts what the controllers do.
"""
