"""The only code that reads or writes under the mail root."""
