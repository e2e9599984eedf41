"""Embedding schemes: one module per kind of table, each with its closed-form byte count, and
the settings that pick a scheme per table (``scheme_settings.py``, importable without torch).

The package imports nothing itself, so that reading the settings does not load torch. The
registry that ties each scheme's settings, tables, bytes and budget search together is
``models/schemes.py``.
"""
