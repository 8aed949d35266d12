"""Where a new message comes in: the policy, aliases, the one accept path, local submission."""
