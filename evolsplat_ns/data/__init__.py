"""Data side: parse scene folders -> index keyframes/segments -> schedule -> assemble segment batches."""
