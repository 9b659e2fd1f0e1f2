"""The enrichment model: bundle format, network and the serving API.

Free of Celery and SQLAlchemy on purpose: training, evaluation and the worker all import it.
"""

from worker.model.bundle import (
    EnrichModel,
    RawOutput,
    build_from_bundle,
    clear_cache,
    load_bundle,
    resolve_device,
    save_bundle,
)
from worker.model.config import BundleConfig, DecoderConfig, PreprocessConfig
from worker.model.network import BACKBONES, EnrichNet, create_model
from worker.model.preprocess import normalize, preprocess_image
from worker.model.random_bundle import write_random_bundle
from worker.model.tokenizer import TitleCodec, train_tokenizer

__all__ = [
    "BACKBONES",
    "BundleConfig",
    "DecoderConfig",
    "EnrichModel",
    "EnrichNet",
    "PreprocessConfig",
    "RawOutput",
    "TitleCodec",
    "build_from_bundle",
    "clear_cache",
    "create_model",
    "load_bundle",
    "normalize",
    "preprocess_image",
    "resolve_device",
    "save_bundle",
    "train_tokenizer",
    "write_random_bundle",
]
