"""ESMTP: the wire format (framing, addresses, replies) apart from the session's decisions."""
