"""The control socket: its commands declared once, as AMP, its server side, relayctl route."""
