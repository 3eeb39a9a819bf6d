"""Data: QA records, TOFU files, author splits and forget-set validation."""
