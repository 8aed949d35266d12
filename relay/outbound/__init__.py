"""The outbound ESMTP client: one message, one destination, a list of hops."""
