"""MiLoRA: LoRA fine-tuning that starts from the minor singular components of each weight."""

from milora.analysis import analyze_adapter
from milora.config import TrainConfig, load_config
from milora.linalg.decomposition import select_components
from milora.initialization import INIT_MODES, get_model
from milora.models import load_base_model
from milora.persistence import load_model, save_adapter
from milora.training import train

__version__ = "0.1.0"

__all__ = [
    "INIT_MODES",
    "TrainConfig",
    "analyze_adapter",
    "get_model",
    "load_base_model",
    "load_config",
    "load_model",
    "save_adapter",
    "select_components",
    "train",
]
