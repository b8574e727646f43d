"""Liver Node service: configuration, command line, C-STORE SCP, scheduler, worker and database."""

__version__ = "0.1.0"
