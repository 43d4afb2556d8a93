"""Code shared by every Cumulus service: events, subjects, bus, event log, config."""
