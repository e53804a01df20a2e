"""The VLLM Workbench: compose an image encoder, a modality integrator and an LLM into one model.

Public API (what the CLI, the app and the notebooks use):
    ModelConfig, EncoderSpec, IntegratorSpec, LLMSpec, PeftSpec   — specs, YAML round trip
    VisionLanguageModel                                           — build, forward, generate, stream, save/load
    ChatSession                                                   — multi-turn streaming chat
    ENCODERS, INTEGRATORS, LLMS                                   — registries with metadata
"""
from .config import EncoderSpec, IntegratorSpec, LLMSpec, ModelConfig, PeftSpec, load_model_config, save_model_config
from .errors import ConfigError, ImageError, OfflineError, UnknownComponentError, WorkbenchError

__version__ = "0.1.0"


def __getattr__(name):  # heavy imports (torch, transformers) only when asked for
    if name == "VisionLanguageModel":
        from .model import VisionLanguageModel

        return VisionLanguageModel
    if name == "ChatSession":
        from .chat import ChatSession

        return ChatSession
    if name == "ENCODERS":
        from .encoders import ENCODERS

        return ENCODERS
    if name == "INTEGRATORS":
        from .integrators import INTEGRATORS

        return INTEGRATORS
    if name == "LLMS":
        from .llm import LLMS

        return LLMS
    raise AttributeError(name)


__all__ = [
    "ModelConfig", "EncoderSpec", "IntegratorSpec", "LLMSpec", "PeftSpec", "load_model_config", "save_model_config",
    "VisionLanguageModel", "ChatSession", "ENCODERS", "INTEGRATORS", "LLMS",
    "WorkbenchError", "ConfigError", "ImageError", "OfflineError", "UnknownComponentError",
]
