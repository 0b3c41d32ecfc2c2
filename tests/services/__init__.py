"""Tiny services the tests run under hadctl."""
