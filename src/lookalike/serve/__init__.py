"""Similarity search as a web service: REST API, web page and metrics over an index (`lookalike serve`)."""
