"""Hawker: an LLM inference engine with a vLLM-shaped offline API."""

from hawker.llm import LLM
from hawker.outputs import CompletionOutput, Logprob, RequestOutput
from hawker.sampling_params import SamplingParams
from hawker.structured.params import StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]
__version__ = "0.1.0"
