"""Model sources and per-architecture export specs."""

from models.dims import ModelDims, dims_from_config
from models.registry import DECODER, ENCODER, REGISTRY, ArchSpec, get_spec, supported
from models.sources import PACKAGED, ModelSource, resolve

__all__ = ["DECODER", "ENCODER", "PACKAGED", "REGISTRY", "ArchSpec", "ModelDims", "ModelSource",
           "dims_from_config", "get_spec", "resolve", "supported"]
