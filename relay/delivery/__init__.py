"""Where a message goes (routing, MX) and one delivery attempt: local, or by the outbound client."""
