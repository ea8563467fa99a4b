"""One-command recipes that chain the training stages (see each module's docstring)."""
