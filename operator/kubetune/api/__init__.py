"""The kubetune API."""
