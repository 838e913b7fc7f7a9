"""Sweeps, tables, figures and reports."""
