"""pdserve's model runtime, shared by the prefill and decode pools. No Ray, no gRPC."""
from engine.llm import LLM
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams"]
