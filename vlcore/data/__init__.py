"""Dataset adapters: every source is mapped into one `Example` record."""
