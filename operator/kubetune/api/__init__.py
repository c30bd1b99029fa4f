"""The kubetune API: the pydantic models of `v1alpha1`, from which the CRDs and docs/api.md are generated."""
