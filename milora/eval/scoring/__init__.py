"""Scoring: answer extraction and grading, the judge, the code sandbox, answers made elsewhere."""
