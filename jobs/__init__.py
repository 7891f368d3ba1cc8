"""Batch scoring jobs: JSONL files of conversations scored in the background."""
