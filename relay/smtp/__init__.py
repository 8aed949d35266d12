"""SMTP: the inbound server (server.py, dataread.py) and the outbound client (client.py)."""
