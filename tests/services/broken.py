"""A module that fails on import."""
raise ImportError("this module is broken on purpose")
