"""A request's output text, token by token: incremental detokenization and stop strings. Pure
Python over any tokenizer with `decode(ids) -> str`, importing nothing of the project's, so the
engine's offline API and the router (which must not import the engine) share one implementation."""
from detok.incremental import IncrementalDetokenizer, context_of, output_text
from detok.stop import StopStrings

__all__ = ["IncrementalDetokenizer", "StopStrings", "context_of", "output_text"]
