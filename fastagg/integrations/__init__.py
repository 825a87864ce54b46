"""Integrations with FL frameworks: ``fastagg.integrations.flower`` (pip install fastagg[flower])."""
