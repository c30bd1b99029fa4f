"""The operator's Kubernetes I/O, and nothing else: the API client (`client`), children written only where their
owner controls them (`children`), status patches (`status_writer`) and Events (`events`). The operator's
one other I/O, HTTP to the server pods, is adapters/http.py."""
