"""relayctl: the administrator's command and its verbs (live over the control socket, or offline)."""
