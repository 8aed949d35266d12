"""The inbound ESMTP server: sessions, AUTH, DATA into the intake (relay.intake.accept)."""
