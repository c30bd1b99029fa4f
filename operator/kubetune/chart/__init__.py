"""The Helm chart's generated parts (charts/kubetune): CRD templates, values.schema.json, Argo CD checks."""
