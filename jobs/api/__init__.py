"""The OpenAI-compatible /v1 surface: Files and Batches, so the official SDK drives Batchsite unchanged.

auth.py: bearer tokens and the `api_view` decorator (errors in OpenAI's shape, jobs/errors.py); files.py
and batches.py: the resources; pagination.py: OpenAI's cursor lists.
"""
