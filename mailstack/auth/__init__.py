"""Who may log in and where mail for an address goes: users, aliases, checker."""
