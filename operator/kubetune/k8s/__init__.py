"""The operator's only I/O: server-side apply, reads, status patches and events."""
