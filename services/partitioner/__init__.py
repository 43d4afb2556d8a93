"""The partitioner service."""
