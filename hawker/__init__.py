"""Hawker: an LLM inference engine with a vLLM-shaped offline API."""

from hawker.llm import LLM
from hawker.outputs import CompletionOutput, Logprob, RequestOutput
from hawker.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
