"""Bridges to the field's harnesses: lm-evaluation-harness and lmms-eval."""
