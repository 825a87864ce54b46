"""Integrations: ``fastagg.integrations.flower`` (Flower strategies; pip install fastagg[flower]) and
``fastagg.integrations.http`` (a plain HTTP server and client, standard library only)."""
