"""Pure functions: validated spec + plan + operator config -> child manifests (plain dicts). No I/O."""
