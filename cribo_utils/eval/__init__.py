"""Evaluations of frozen backbones."""
