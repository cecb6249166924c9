"""Contracts shared by every service: change events, chunks, point payloads, settings, errors, logging.

This package imports none of the services.
"""
