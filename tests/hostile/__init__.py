"""Hostile and broken submissions, generated from a chapter's release notebook (tests and benchmark)."""
