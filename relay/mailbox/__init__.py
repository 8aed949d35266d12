"""Local mailboxes: Maildir, the users file, the POP3 server."""
