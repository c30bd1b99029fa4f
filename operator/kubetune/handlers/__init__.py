"""kopf handlers: the only place that imports kopf. Each handler reads, calls pure layers, writes."""
