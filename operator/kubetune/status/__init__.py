"""Status: conditions, and the summary state derived from the children (pure functions)."""
