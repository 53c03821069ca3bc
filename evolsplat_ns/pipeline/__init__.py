"""The train step: shared extraction once, per-view losses, one exact backward through the shared graph."""
