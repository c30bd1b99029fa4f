"""kopf registrations: the only place that imports kopf (tests/unit/test_layers.py holds it so).

Each module registers the indexes (the operator's view of the cluster, fed by the watch streams) and the
watch-event handlers of one kind; a handler dismisses on the event loop what changes nothing and runs a
controller function (controllers/) on a worker thread. `main` configures kopf and runs it.
"""
