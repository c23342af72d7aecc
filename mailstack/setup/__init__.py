"""Set-up without tears: the DNS records a domain needs (``mailstack dns``) and
a check of what DNS and the network really say (``mailstack check``)."""
