"""The OpenAI-compatible /v1 surface: Files and Batches, so the official SDK drives Batchsite unchanged.

auth.py: tokens, the `api_view` decorator and OpenAI's error shape; files.py and batches.py: the
resources; pagination.py: OpenAI's cursor lists; account.py: the page where people manage tokens.
"""
