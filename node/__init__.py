"""Liver Node service: configuration, command line, C-STORE SCP, scheduler, worker and database."""
