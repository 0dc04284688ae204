"""The REST API, one router per concern; `serve/app.py` puts them together."""
