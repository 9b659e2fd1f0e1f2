"""The contract every other package shares: settings, events, result types, tables, repository.

Imports nothing of ours and opens no connection at import time.
"""
