"""Cost models, apart from the passes: static memory and communication estimates of a graph."""
