"""The enrichment model: bundle format (`bundle`, `config`), network, tokenizer and preprocessing.

Free of Celery and SQLAlchemy on purpose: training, evaluation and the worker all import it. Import from
the submodules: this package imports nothing itself, so that decoding worker processes can import the
torch-free `config` and `preprocess` without paying for torch.
"""
