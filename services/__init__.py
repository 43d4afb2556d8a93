"""Cumulus's four services: gateway, scheduler, partitioner, runner."""
