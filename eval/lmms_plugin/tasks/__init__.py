"""Task folder lmms-eval adds to its search path for this plugin (lmms-eval's own tasks are used; none ship here)."""
