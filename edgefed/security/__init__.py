"""Credentials, TLS material and broker access for a deployment; signed globals and tasks."""
