"""Bridges from laet_fast's layer selections to other libraries (PEFT)."""
